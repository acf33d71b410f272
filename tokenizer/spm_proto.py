"""The few fields of a SentencePiece model proto that domainlm reads or rewrites, by hand.

Not through sentencepiece's generated protobuf module: its protobuf runtime requirement clashes
with apache-beam's pin in some sentencepiece releases (see hf_export.py), and the data stage's
workers read these fields too. The protobuf wire format is small: each field is a varint key
(number << 3 | wire type) and a value (a varint, 8 or 4 fixed bytes, or a length and bytes).

Field numbers (sentencepiece_model.proto): ModelProto.trainer_spec = 2, .normalizer_spec = 3;
TrainerSpec.model_prefix = 2, .model_type = 3, .treat_whitespace_as_suffix = 24; NormalizerSpec
.name = 1, .precompiled_charsmap = 2, .add_dummy_prefix = 3, .remove_extra_whitespaces = 4,
.escape_whitespaces = 5. tests/test_segment_cache.py and tests/test_tokenizer.py check them
against sentencepiece's own module.
"""

from __future__ import annotations

from collections.abc import Iterator

TRAINER_SPEC = 2
NORMALIZER_SPEC = 3
MODEL_PREFIX = 2
_LEN = 2                                                # the wire type of strings and messages


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b, value = value & 0x7F, value >> 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def records(buf: bytes) -> Iterator[tuple[int, int, int | bytes, int, int]]:
    """(number, wire type, value, start, end) of each field in a message, in order; the value
    is an int for varints and bytes otherwise; buf[start:end] is the field's whole encoding."""
    i, n = 0, len(buf)
    while i < n:
        start = i
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == _LEN:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value, start, i


def fields(buf: bytes) -> dict[int, list]:
    """A message's fields by number, each a list of its values in order (the last one counts)."""
    out: dict[int, list] = {}
    for number, _, value, _, _ in records(buf):
        out.setdefault(number, []).append(value)
    return out


def last(fields_: dict[int, list], number: int, default):
    return fields_[number][-1] if number in fields_ else default


def _length_delimited(number: int, value: bytes) -> bytes:
    return _encode_varint(number << 3 | _LEN) + _encode_varint(len(value)) + value


def with_model_prefix(model: bytes, prefix: str) -> bytes:
    """The model with its trainer spec's model_prefix set to `prefix`, every other byte as it was.

    SentencePiece records the path it was asked to write to; ours is a temporary directory named
    after the host and the process, so two identical trainings would write different files."""
    field, out = _length_delimited(MODEL_PREFIX, prefix.encode("utf-8")), bytearray()
    for number, wire, value, start, end in records(model):
        if number == TRAINER_SPEC and wire == _LEN:
            spec, done = bytearray(), False
            for n, w, _, s, e in records(value):
                if n == MODEL_PREFIX and w == _LEN:     # in its place, once
                    spec += b"" if done else field
                    done = True
                else:
                    spec += value[s:e]
            out += _length_delimited(TRAINER_SPEC, bytes(spec if done else spec + field))
        else:
            out += model[start:end]
    return bytes(out)
