"""The classify message body: one codec, versioned; older bodies are read, unknown ones refused."""

from __future__ import annotations

import json

import pytest

from batchvision.server.messages import Chunk, ClassifyMessage, MessageError, split


def test_a_message_round_trips_through_json_with_its_version() -> None:
    message = ClassifyMessage((Chunk.of("a", [0, 1]), Chunk.of("b", [7])), 1.5, True)
    args = json.loads(json.dumps(message.to_args()))
    assert args[0]["v"] == 2
    assert ClassifyMessage.from_args(args) == message
    assert message.images == 3 and message.jobs == ["a", "b"]


def test_a_version_1_body_from_an_older_api_is_read() -> None:
    positional = [[["a", [0, 1]], ["b", [7]]], 1.5, True]
    expected = ClassifyMessage((Chunk.of("a", [0, 1]), Chunk.of("b", [7])), 1.5, True)
    assert ClassifyMessage.from_args(positional) == expected
    assert ClassifyMessage.from_args([[["a", [0]]]], {"interactive": True}).interactive


def test_an_unknown_version_is_refused_naming_it() -> None:
    with pytest.raises(MessageError, match=r"version 3 is not readable.*reads versions 1, 2"):
        ClassifyMessage.from_args([{"v": 3, "chunks": []}])
    for bad in ([], [[["a", ["x"]]]], [{"v": 2, "chunks": "a"}], [[[["a"], [0]]]]):
        with pytest.raises(MessageError):
            ClassifyMessage.from_args(bad)


def test_split_makes_task_sized_chunks_in_order() -> None:
    assert split("j", [0, 1, 2, 3, 4], 2) == [Chunk("j", (0, 1)), Chunk("j", (2, 3)), Chunk("j", (4,))]
