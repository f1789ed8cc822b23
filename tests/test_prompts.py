import pytest

from routecap.prompts import PromptFileError, read_prompts


def test_text_lines_skip_blank(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("hello\n\n  \nworld # not a comment\n")
    got = read_prompts(p)
    assert [(x.request_id, x.text) for x in got] == [("0", "hello"), ("1", "world # not a comment")]


def test_ids_lines(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("1 2 3\n4,5\n")
    assert [x.token_ids for x in read_prompts(p, "ids")] == [(1, 2, 3), (4, 5)]
    p.write_text("1 x\n")
    with pytest.raises(PromptFileError, match=r"p.txt:1: expected token ids \(integers\)"):
        read_prompts(p, "ids")


def test_jsonl_forms(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('"a"\n{"text": "b", "id": 7}\n{"input_ids": [1, 2]}\n{"request_id": "z", "prompt": "c"}\n')
    got = read_prompts(p)
    assert [(x.request_id, x.text, x.token_ids) for x in got] == [
        ("0", "a", None), ("7", "b", None), ("2", None, (1, 2)), ("z", "c", None)]


@pytest.mark.parametrize("content,text", [
    ("{bad json\n", "p.jsonl:1: not JSON"),
    ("[1, 2]\n", "p.jsonl:1: expected a string or an object, got list"),
    ('{"foo": 1}\n', "expected a 'prompt' or 'text' string or an 'input_ids' list, got keys ['foo']"),
    ('{"input_ids": []}\n', "non-empty list of non-negative token ids"),
    ('{"input_ids": [1, -2]}\n', "non-empty list of non-negative token ids"),
    ('"a"\n{"id": "0", "text": "b"}\n', "request id '0' appears twice"),
    ("\n\n", "holds no prompt"),
])
def test_jsonl_errors_name_the_line(tmp_path, content, text):
    p = tmp_path / "p.jsonl"
    p.write_text(content)
    with pytest.raises(PromptFileError, match=text.replace("[", r"\[").replace("]", r"\]")):
        read_prompts(p)


def test_missing_and_not_utf8(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        read_prompts(tmp_path / "none.txt")
    p = tmp_path / "bin.txt"
    p.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(PromptFileError, match="not UTF-8"):
        read_prompts(p)
    with pytest.raises(PromptFileError, match="unknown prompts format"):
        read_prompts(p, "xml")
