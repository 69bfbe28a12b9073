"""Where the C frame codec is expected (CI sets PISTREAM_REQUIRE_CODEC=1), its absence is a failure: the
extension is optional, so a broken build would otherwise fall back to msgspec without a word."""

import os
import subprocess
import sys

import pytest

from pistream.stream.columns import DECODER, FRAME_CODEC

REQUIRED = os.environ.get("PISTREAM_REQUIRE_CODEC") == "1"


@pytest.mark.skipif(not REQUIRED, reason="PISTREAM_REQUIRE_CODEC=1 is not set")
def test_the_c_frame_codec_is_built_and_chosen():
    assert FRAME_CODEC and DECODER == "C frame codec"
    # In a fresh interpreter too (no test's monkeypatching), and the module really is the extension.
    out = subprocess.run([sys.executable, "-c", "import pistream.stream._framecodec as m, pistream.stream.columns as c;"
                          "print(c.FRAME_CODEC, m.__file__)"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built, path = out.stdout.split()
    assert built == "True" and path.endswith((".so", ".pyd"))


def test_the_decoder_name_says_which_path_reads_frames():
    assert DECODER == ("C frame codec" if FRAME_CODEC else "msgspec (C frame codec not built)")
