import numpy as np
import pytest

from ttsrl.triton_client import pad_rows, parse_url, parse_urls


def test_server_urls():
    assert parse_urls("grpc://a:1, http://b:2/") == (("grpc", "a:1"), ("http", "b:2"))
    assert parse_urls("h:5", protocol="http") == (("http", "h:5"),)
    assert parse_url("h:5") == ("grpc", "h:5")
    for bad in ("ftp://a:1", "grpc://nohost", "", "grpc://a:x"):
        with pytest.raises(ValueError):
            parse_urls(bad)
    with pytest.raises(ValueError, match="expected one URL"):
        parse_url("grpc://a:1,grpc://b:2")


def test_pad_rows():
    padded, lengths = pad_rows([np.array([1, 2, 3]), None, np.array([4])], np.int32)
    assert padded.tolist() == [[1, 2, 3], [0, 0, 0], [4, 0, 0]] and padded.dtype == np.int32
    assert lengths.tolist() == [[3], [0], [1]]
