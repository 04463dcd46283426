import json
import math

import numpy as np

from ttsrl.json_lines import json_lines, plain


def test_each_record_keeps_its_line_and_a_bad_line_its_error():
    rows = list(json_lines('{"a": 1}\n\n  \nnot json\n[2]\n'))
    assert [(number, value) for number, value, error in rows if error is None] == [(1, {"a": 1}), (5, [2])]
    (number, value, error), = [row for row in rows if row[2] is not None]
    assert (number, value, error.colno) == (4, None, 1)


def test_plain_makes_parquet_and_batch_values_json_ready_and_nan_only_when_asked():
    value = {1: np.array([3, 4]), "s": np.float32(0.5), "rows": (np.array(["a"], dtype=object), {"x": float("nan")})}
    kept = plain(value)
    assert kept["1"] == [3, 4] and type(kept["1"][0]) is int and type(kept["s"]) is float
    assert kept["rows"][0] == ["a"]
    assert math.isnan(kept["rows"][1]["x"])  # callers that keep NaN get it back (DPO's parquet rows)
    strict = plain(value, nan_as_none=True)
    assert strict["rows"][1]["x"] is None
    assert json.loads(json.dumps(strict, allow_nan=False)) == strict
