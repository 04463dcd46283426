"""ttsrl.triton_client without a server: the wire format, readiness of nothing, the CLI
(both environments). Against a live server: tests/token2wav_server/test_eval_clients.py
(TritonModelClient) and test_reward_client.py (RewardClient)."""
import numpy as np
import pytest

from token2wav_server.launch import free_ports
from ttsrl.triton_client import pad_rows, parse_url, parse_urls, server_ready
from ttsrl.triton_client.__main__ import main as cli_main
from ttsrl.triton_client.ready import readiness_problem
from ttsrl.triton_client.wire import DEFAULT_SERVER_URL, env_server_url, infer_request, text_column


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


def test_text_column_and_infer_request():
    column = text_column(["一丁", ""])
    assert column.shape == (2, 1) and column.dtype == object and column[0, 0] == "一丁".encode()
    tokens, lengths = pad_rows([np.array([5, 6])], np.int32)
    inputs, outputs = infer_request("http", {"TOKENS": tokens, "TOKEN_LENS": lengths, "GT_TEXT": column[:1]},
                                    ["REWARDS"])
    assert [(t.name(), t.datatype(), t.shape()) for t in inputs] == [
        ("TOKENS", "INT32", [1, 2]), ("TOKEN_LENS", "INT32", [1, 1]), ("GT_TEXT", "BYTES", [1, 1])]
    assert [o.name() for o in outputs] == ["REWARDS"]


def test_readiness_of_a_port_nobody_serves_and_the_cli(capsys):
    dead = f"grpc://127.0.0.1:{free_ports(1)[0]}"
    assert server_ready(dead, timeout_s=1.0) is False
    assert server_ready(dead.replace("grpc", "http"), timeout_s=1.0) is False
    assert readiness_problem(dead, timeout_s=1.0).startswith("does not answer (")
    assert cli_main([dead]) == 1
    assert f"reward server at {dead} does not answer (" in capsys.readouterr().err
    assert cli_main(["ftp://a:1"]) == 2
    assert "usage: python -m ttsrl.triton_client" in capsys.readouterr().err
    assert cli_main([dead, "--model"]) == 2 and "--model needs a name" in capsys.readouterr().err


def test_clients_default_to_the_first_exported_server(monkeypatch):
    monkeypatch.setenv("REWARD_SERVER_URL", "grpc://a:1, http://b:2")
    assert env_server_url() == "grpc://a:1, http://b:2" and env_server_url(first=True) == "grpc://a:1"
    monkeypatch.setenv("REWARD_SERVER_URL", "")
    assert env_server_url() == DEFAULT_SERVER_URL == "grpc://127.0.0.1:8001"
