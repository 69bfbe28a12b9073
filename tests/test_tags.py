import pytest

from pistream.errors import TagsFileError
from pistream.pi.tags import parse_tags, read_tags_file


def test_windows_editor_file_with_bom_crlf_comments_spaces_and_duplicates(tmp_path):
    path = tmp_path / "tags.txt"
    path.write_bytes(
        "\ufeff# plant A\r\n\r\n  \\\\PISRV01\\SINUSOID  \r\n\\\\pisrv01\\sinusoid\r\n"
        "CDT158\r\n\t\\\\AF01\\DB\\Pump|Flow\r\n".encode()
    )
    result = read_tags_file(path, default_server="PISRV01")
    assert result.paths == [
        "\\\\PISRV01\\SINUSOID",
        "\\\\PISRV01\\CDT158",
        "\\\\AF01\\DB\\Pump|Flow",
    ]
    assert result.duplicates == [(4, "\\\\pisrv01\\sinusoid")]


def test_bare_name_without_server_names_the_line_and_the_fix():
    with pytest.raises(TagsFileError, match=r"tags.txt:2: bare tag name 'CDT158' needs a server: pass --server"):
        parse_tags("\\\\S\\A\nCDT158\n", source="tags.txt")


@pytest.mark.parametrize("text", ["", "# only a comment\n\n", "\ufeff  \r\n"])
def test_empty_file_is_an_error(text):
    with pytest.raises(TagsFileError, match="lists no tags"):
        parse_tags(text)


def test_missing_file_says_which_and_how_to_fix(tmp_path):
    with pytest.raises(TagsFileError, match=r"tags file '.*nope.txt' not found: pass --tags PATH"):
        read_tags_file(tmp_path / "nope.txt")


@pytest.mark.parametrize("line", ["\\\\SERVERONLY", "\\\\S\\", "\\SINGLE\\TAG"])
def test_malformed_paths_are_rejected(line):
    with pytest.raises(TagsFileError, match="<tags>:1"):
        parse_tags(line + "\n")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "tags.txt"
    path.write_bytes(b"\\\\S\\T\xe9\n")
    with pytest.raises(TagsFileError, match="not UTF-8"):
        read_tags_file(path)


def test_masks_are_kept_apart_from_exact_lines_in_file_order():
    result = parse_tags("\\\\PISRV01\\FIC*\nSINUSOID\nTI-1??-PV\n\\\\pisrv01\\fic*\n\\\\PISRV01\\CDT158\n",
                        default_server="PISRV01")
    assert result.paths == ["\\\\PISRV01\\SINUSOID", "\\\\PISRV01\\CDT158"]
    assert result.masks == ["\\\\PISRV01\\FIC*", "\\\\PISRV01\\TI-1??-PV"]
    assert result.duplicates == [(4, "\\\\pisrv01\\fic*")]


def test_a_file_of_masks_only_is_a_tags_file():
    assert parse_tags("\\\\PISRV01\\*\n").masks == ["\\\\PISRV01\\*"]


@pytest.mark.parametrize(("line", "says"), [
    ("\\\\PISRV0?\\FIC*", "wildcard in the server name"),
    ("\\\\AF01\\DB\\Pump*|Flow", "AF attribute mask: pistream resolves masks of PI point names only"),
])
def test_masks_pistream_cannot_resolve_name_the_line_and_the_fix(line, says):
    with pytest.raises(TagsFileError, match=f"tags.txt:2: .*{says}"):
        parse_tags("\\\\PISRV01\\A\n" + line + "\n", source="tags.txt")
