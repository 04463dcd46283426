from ttsrl.json_lines import json_lines


def test_each_record_keeps_its_line_and_a_bad_line_its_error():
    rows = list(json_lines('{"a": 1}\n\n  \nnot json\n[2]\n'))
    assert [(number, value) for number, value, error in rows if error is None] == [(1, {"a": 1}), (5, [2])]
    (number, value, error), = [row for row in rows if row[2] is not None]
    assert (number, value, error.colno) == (4, None, 1)
