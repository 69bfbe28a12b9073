import uuid

import pytest

from pistream.pi.webid import (
    attribute_webid,
    dataserver_webid,
    id_only_point_webid,
    path_from_webid,
    path_webid,
    point_webid,
    upper_invariant,
)


def test_checked_examples_from_the_pi_web_api_notes():
    assert point_webid("\\\\MyPIServer\\sinusoid") == "P1DPTVlQSVNFUlZFUlxTSU5VU09JRA"
    assert dataserver_webid("\\\\MyPIServer") == "P1DSTVlQSVNFUlZFUg"
    assert (attribute_webid("\\\\MyAssetServer\\MyDatabase\\MyElement|Water")
            == "P1AbETVlBU1NFVFNFUlZFUlxNWURBVEFCQVNFXE1ZRUxFTUVOVHxXQVRFUg")
    assert (id_only_point_webid(uuid.UUID("7f16bd6b-c14c-4e03-822e-457da2f35081"), 8)
            == "I1DPa70Wf0zBA06CLkV9ovNQgQCAAAAA")


def test_path_webid_picks_attribute_for_pipe_paths():
    assert path_webid("\\\\AF\\DB\\E|A").startswith("P1AbE")
    assert path_webid("\\\\PI\\TAG").startswith("P1DP")


def test_upper_case_follows_dotnet_invariant_not_python_special_casing():
    assert "ß".upper() == "SS"
    assert upper_invariant("straße") == "STRAßE"
    assert upper_invariant("µ-tag") == "Μ-TAG"


@pytest.mark.parametrize("path", ["\\\\PISRV\\Temp.PV", "\\\\AF\\DB\\Pump 1|Flow", "\\\\SRV\\Ünïcödé"])
def test_round_trip(path):
    assert path_from_webid(path_webid(path)) == upper_invariant(path)


@pytest.mark.parametrize("bad", ["", "I1DPabc", "P1XXabc", "P1Ab!!!"])
def test_decoding_rejects_what_is_not_path_only(bad):
    with pytest.raises(ValueError):
        path_from_webid(bad)
