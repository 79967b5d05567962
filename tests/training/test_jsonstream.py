"""The streaming dataset reader: every complete record of a file cut anywhere, across chunk boundaries; a clean
stop at the cut; an error for what more text could not repair."""

from __future__ import annotations

import json

import pytest

from hass_deploy.errors import HassDeployError
from hass_deploy.training import jsonstream
from hass_deploy.training.jsonstream import JsonRecords

RECORDS = [
    {"id": "a_0", "conversations": [{"from": "human", "value": "héllo, wörld \u2603"}, {"from": "gpt", "value": "1.5"}]},
    {"id": "a_1", "n": [1, 2.25, -3e2, True, False, None], "s": "quote \" and \\ backslash \\u0041"},
    {"id": "b", "deep": {"x": [{"y": []}, {}]}, "text": "line\nbreak"},
]


def read(path) -> tuple[list, JsonRecords]:
    stream = JsonRecords(path)
    return [record for _, record in stream], stream


@pytest.fixture(params=[3, 1 << 20], ids=["3-char-chunks", "one-chunk"])
def chunk(request, monkeypatch):
    monkeypatch.setattr(jsonstream, "CHUNK", request.param)
    return request.param


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_list_cut_anywhere_gives_its_complete_records(tmp_path, chunk, indent):
    text = json.dumps(RECORDS, indent=indent, ensure_ascii=False)
    data = text.encode()
    ends, pos = [], text.index("[") + 1  # each record's last byte + 1, found by the stdlib's decoder
    for _ in RECORDS:
        pos = len(text) - len(text[pos:].lstrip(" \n,"))
        pos = json.JSONDecoder().raw_decode(text, pos)[1]
        ends.append(len(text[:pos].encode()))
    path = tmp_path / "cut.json"
    for size in range(data.index(b"[") + 1, len(data) + 1):  # every cut, mid-character ones included
        path.write_bytes(data[:size])
        records, stream = read(path)
        assert records == RECORDS[: sum(end <= size for end in ends)], size
        assert stream.read == len(records) and stream.truncated == (size < len(data)), size


def test_json_lines_cut_anywhere_give_their_complete_lines(tmp_path, chunk):
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS).encode()
    path = tmp_path / "cut.jsonl"
    for size in range(1, len(data) + 1):
        path.write_bytes(data[:size])
        records, stream = read(path)
        complete = data[:size].count(b"\n")
        partial = data[:size].split(b"\n")[-1]  # after the last newline
        whole = partial == data.split(b"\n")[complete]  # a last line cut exactly at its record's end is whole
        assert records == RECORDS[: complete + whole], size
        assert stream.truncated == (bool(partial) and not whole), size


def test_what_more_text_could_not_repair_is_an_error_naming_the_record(tmp_path, chunk):
    good = json.dumps(RECORDS[0])
    cases = {
        f"[{good}, {{\"a\": [}}, {good}]": "record 2: malformed JSON",
        f"[{good} {good}]": r"expected ',' or '\]' after record 1",
        f"[{good}, {{\"a\": tru}}]": "record 2: malformed JSON",
    }
    for text, message in cases.items():
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(HassDeployError, match=message):
            read(tmp_path / "bad.json")
    (tmp_path / "bad.jsonl").write_text(f"{good}\n{{oops\n{good}\n")
    with pytest.raises(HassDeployError, match=r"bad\.jsonl:2: not a JSON line"):
        read(tmp_path / "bad.jsonl")
    (tmp_path / "latin1.json").write_bytes(b'[{"a": "caf\xe9"}]')
    with pytest.raises(HassDeployError, match="not a UTF-8 text file"):
        read(tmp_path / "latin1.json")


def test_a_byte_order_mark_and_blank_lines_are_read_past(tmp_path, chunk):
    (tmp_path / "bom.jsonl").write_bytes("\ufeff".encode() + b"\n\n" + json.dumps(RECORDS[2]).encode() + b"\n\n")
    records, stream = read(tmp_path / "bom.jsonl")
    assert records == [RECORDS[2]] and not stream.truncated
    where = [w for w, _ in JsonRecords(tmp_path / "bom.jsonl")]
    assert where == [f"{tmp_path / 'bom.jsonl'}:3"]
