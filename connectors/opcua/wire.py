"""Browse, BrowseNext and Read over asyncua's request path, with the answers decoded by hand.

asyncua's generic binary decoder builds a dataclass per field (three NodeIds with a type-checking
``__post_init__`` per ReferenceDescription, a Variant and a StatusCode per DataValue); for 10,000 devices that
is most of the connector's CPU. Here the request still goes through asyncua (``UaClient._send_request``: request
header, security token, signing and encryption, chunking, request ids, timeouts), and only the raw response
body is decoded here, into light tuples holding what the connector uses:

- :class:`Ref` per reference: reference type, target node id, browse name and type definition (the display
  name, direction and node class are skipped);
- :class:`BrowseResult`: status code, continuation point, references;
- :class:`Reading` per DataValue: the Variant's value, status code (0 for Good when absent), source and server
  timestamps.

Node ids are real :class:`asyncua.ua.NodeId` objects (equal and hashed like the ones asyncua decodes), built
without asyncua's per-object type check since the decoder sets types it has just read. Every NodeId encoding
is handled (two-byte, four-byte, numeric, string, guid, byte string; namespace URI and server index flags
make an :class:`asyncua.ua.ExpandedNodeId`). Variants of the built-in scalar types Boolean to Double, String,
DateTime, ByteString and LocalizedText, and one-dimensional arrays of them, are decoded here; any other
Variant (and a DataValue whose encoding mask has bits this module does not know) is handed to asyncua's own
decoder at that offset, and an answer that is not the expected response type, or that this module cannot
parse, is decoded by asyncua whole (so a malformed answer fails exactly as it did before).

DataValue picoseconds follow OPC UA Part 6 (5.2.2.17): SourceTimestamp, SourcePicoseconds, ServerTimestamp,
ServerPicoseconds. (asyncua 2.1 encodes and decodes both timestamps before both picosecond fields, which only
differs when SourcePicoseconds and ServerTimestamp are both present.) A QualifiedName's namespace index is a
UInt16 as Part 6 says (asyncua reads it as an Int16, so indexes above 32767 come out negative there).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple

from asyncua import ua
from asyncua.common.utils import Buffer
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.ua_binary import struct_from_binary, variant_from_binary

__all__ = [
    "BrowseResult",
    "Reading",
    "Ref",
    "Unsupported",
    "browse",
    "browse_next",
    "decode_browse_response",
    "decode_read_response",
    "fallbacks",
    "read",
    "read_value_ids",
]


class Ref(NamedTuple):
    """One ReferenceDescription, reduced to what the connector uses."""

    reference_type: ua.NodeId
    node_id: ua.NodeId  # an ExpandedNodeId when the target carries a namespace URI or server index
    browse_name: str | None
    browse_name_ns: int
    type_definition: ua.NodeId


class BrowseResult(NamedTuple):
    status: int
    continuation_point: bytes | None
    references: list[Ref]


class Reading(NamedTuple):
    """One DataValue, reduced to what the connector uses."""

    value: Any  # the Variant's value; None when the DataValue has none
    status: int  # the StatusCode's value; 0 (Good) when absent
    source_timestamp: datetime | None
    server_timestamp: datetime | None


class Unsupported(Exception):
    """Something this decoder does not handle: the whole answer goes to asyncua's decoder."""


#: Answers decoded by asyncua instead (process-wide): 0 in normal operation, see :func:`fallbacks`.
_fallbacks = [0]


def fallbacks() -> int:
    """How many answers this process handed to asyncua's decoder because this module could not decode them
    (the connector reports it as ``decoder_fallbacks`` in its health)."""
    return _fallbacks[0]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


_BROWSE_RESPONSE = ObjectIds.BrowseResponse_Encoding_DefaultBinary
_BROWSE_NEXT_RESPONSE = ObjectIds.BrowseNextResponse_Encoding_DefaultBinary
_READ_RESPONSE = ObjectIds.ReadResponse_Encoding_DefaultBinary

_u8 = struct.Struct("<B").unpack_from
_u16 = struct.Struct("<H").unpack_from
_i32 = struct.Struct("<i").unpack_from
_u32 = struct.Struct("<I").unpack_from
_i64 = struct.Struct("<q").unpack_from
_ns_u16 = struct.Struct("<BH").unpack_from
_ns_u32 = struct.Struct("<HI").unpack_from
_ns_len = struct.Struct("<Hi").unpack_from
_KINDS = tuple(ua.NodeIdType)
_new = object.__new__
_NodeId = ua.NodeId
_win_epoch_to_datetime = ua.win_epoch_to_datetime
_MAX_ARRAY = 1 << 24  # elements; a longer array is left to asyncua (which has its own limits)

# Variant built-in types decoded here: type id -> (struct, size) for the fixed-size ones.
_FIXED: dict[int, tuple[Callable[[bytes, int], tuple[Any, ...]], int]] = {
    1: (struct.Struct("<?").unpack_from, 1),
    2: (struct.Struct("<b").unpack_from, 1),
    3: (struct.Struct("<B").unpack_from, 1),
    4: (struct.Struct("<h").unpack_from, 2),
    5: (struct.Struct("<H").unpack_from, 2),
    6: (struct.Struct("<i").unpack_from, 4),
    7: (struct.Struct("<I").unpack_from, 4),
    8: (struct.Struct("<q").unpack_from, 8),
    9: (struct.Struct("<Q").unpack_from, 8),
    10: (struct.Struct("<f").unpack_from, 4),
    11: (struct.Struct("<d").unpack_from, 8),
}
_VT_STRING, _VT_DATETIME, _VT_BYTESTRING, _VT_LOCALIZEDTEXT = 12, 13, 15, 21


def _string(data: bytes, pos: int) -> tuple[str | None, int]:
    (length,) = _i32(data, pos)
    pos += 4
    if length == -1:
        return None, pos
    if length < 0 or pos + length > len(data):
        raise Unsupported(f"string of length {length} at {pos}")
    return data[pos : pos + length].decode("utf-8", errors="surrogateescape"), pos + length


def _bytestring(data: bytes, pos: int) -> tuple[bytes | None, int]:
    (length,) = _i32(data, pos)
    pos += 4
    if length == -1:
        return None, pos
    if length < 0 or pos + length > len(data):
        raise Unsupported(f"byte string of length {length} at {pos}")
    return data[pos : pos + length], pos + length


def _nodeid(data: bytes, pos: int, expanded: bool) -> tuple[ua.NodeId, int]:
    """A NodeId (or, with ``expanded``, an ExpandedNodeId) starting at ``pos``."""
    encoding = data[pos]
    kind = encoding & 0x3F
    ident: Any  # asyncua's NewTypes (Int16, String, ...) are the plain values at run time
    ns: Any
    if kind == 0:
        ns, ident = 0, data[pos + 1]
        pos += 2
    elif kind == 1:
        ns, ident = _ns_u16(data, pos + 1)
        pos += 4
    elif kind == 2:
        ns, ident = _ns_u32(data, pos + 1)
        pos += 7
    elif 3 <= kind <= 5:
        (ns,) = _u16(data, pos + 1)
        pos += 3
        if kind == 3:
            ident, pos = _string(data, pos)
        elif kind == 5:
            ident, pos = _bytestring(data, pos)
        else:
            if pos + 16 > len(data):
                raise Unsupported(f"guid cut short at {pos}")
            ident = uuid.UUID(bytes_le=bytes(data[pos : pos + 16]))
            pos += 16
        if ident is None:
            raise Unsupported("null string or byte string identifier")
    else:
        raise Unsupported(f"NodeId encoding {encoding:#04x}")
    if encoding & 0xC0:
        if not expanded:
            raise Unsupported(f"ExpandedNodeId flags {encoding:#04x} in a NodeId field")
        uri: Any = None
        server: Any = None
        if encoding & 0x80:
            uri, pos = _string(data, pos)
        if encoding & 0x40:
            (server,) = _u32(data, pos)
            pos += 4
        return ua.ExpandedNodeId(ident, ns, _KINDS[kind], uri, server), pos
    node = _new(_NodeId)
    node.Identifier = ident
    node.NamespaceIndex = ns
    node.NodeIdType = _KINDS[kind]
    return node, pos


def _localized_text(data: bytes, pos: int) -> tuple[ua.LocalizedText, int]:
    mask = data[pos]
    pos += 1
    if mask & ~0x03:
        raise Unsupported(f"LocalizedText mask {mask:#04x}")
    locale = text = None
    if mask & 0x01:
        locale, pos = _string(data, pos)
    if mask & 0x02:
        text, pos = _string(data, pos)
    return ua.LocalizedText(text, locale), pos


def _skip_localized_text(data: bytes, pos: int) -> int:
    mask = data[pos]
    pos += 1
    if mask & ~0x03:
        raise Unsupported(f"LocalizedText mask {mask:#04x}")
    for bit in (0x01, 0x02):  # Locale, Text
        if mask & bit:
            (length,) = _i32(data, pos)
            if length < -1:
                raise Unsupported(f"string of length {length} at {pos}")
            pos += 4 + max(length, 0)
    if pos > len(data):
        raise Unsupported("LocalizedText cut short")
    return pos


def _scalar(vtype: int, data: bytes, pos: int) -> tuple[Any, int]:
    fixed = _FIXED.get(vtype)
    if fixed is not None:
        unpack, size = fixed
        return unpack(data, pos)[0], pos + size
    if vtype == _VT_STRING:
        return _string(data, pos)
    if vtype == _VT_DATETIME:
        return _win_epoch_to_datetime(_i64(data, pos)[0]), pos + 8
    if vtype == _VT_BYTESTRING:
        return _bytestring(data, pos)
    if vtype == _VT_LOCALIZEDTEXT:
        return _localized_text(data, pos)
    raise Unsupported(f"Variant type {vtype}")


def _variant(data: bytes, pos: int) -> tuple[Any, int]:
    """A Variant's value; types this module does not decode go to asyncua's decoder at the same offset."""
    encoding = data[pos]
    fixed = _FIXED.get(encoding)  # the common cases first: a scalar number, a string
    if fixed is not None:
        return fixed[0](data, pos + 1)[0], pos + 1 + fixed[1]
    if encoding == _VT_STRING:
        return _string(data, pos + 1)
    vtype = encoding & 0x3F
    if encoding & 0x40 or not (vtype == 0 or vtype in _FIXED or vtype in (
            _VT_STRING, _VT_DATETIME, _VT_BYTESTRING, _VT_LOCALIZEDTEXT)):
        buf = Buffer(data, pos)
        value = variant_from_binary(buf).Value
        return value, buf.cur_pos
    pos += 1
    if vtype == 0:
        if encoding & 0x80:
            raise Unsupported("array of Null")
        return None, pos
    if not encoding & 0x80:
        return _scalar(vtype, data, pos)
    (length,) = _i32(data, pos)
    pos += 4
    if length == -1:
        return None, pos
    if not 0 <= length <= _MAX_ARRAY:
        raise Unsupported(f"array of length {length}")
    fixed = _FIXED.get(vtype)
    if fixed is not None:
        size = fixed[1]
        if pos + length * size > len(data):
            raise Unsupported(f"array cut short at {pos}")
        code = "<" + str(length) + "?bBhHiIqQfd"[vtype - 1]
        return list(struct.unpack_from(code, data, pos)), pos + length * size
    items = []
    for _ in range(length):
        item, pos = _scalar(vtype, data, pos)
        items.append(item)
    return items, pos


def _data_value(data: bytes, pos: int) -> tuple[Reading, int]:
    mask = data[pos]
    if mask & ~0x3F:
        buf = Buffer(data, pos)
        dv = struct_from_binary(ua.DataValue, buf)
        return reading_of(dv), buf.cur_pos
    pos += 1
    value: Any = None
    status = 0
    source = server = None
    if mask & 0x01:
        value, pos = _variant(data, pos)
    if mask & 0x02:
        (status,) = _u32(data, pos)
        pos += 4
    if mask & 0x04:
        source = _win_epoch_to_datetime(_i64(data, pos)[0])
        pos += 8
    if mask & 0x10:
        pos += 2  # SourcePicoseconds
    if mask & 0x08:
        server = _win_epoch_to_datetime(_i64(data, pos)[0])
        pos += 8
    if mask & 0x20:
        pos += 2  # ServerPicoseconds
    if pos > len(data):
        raise Unsupported("DataValue cut short")
    return Reading(value, status, source, server), pos


def _interned(ident: Any, ns: Any = 0) -> ua.NodeId:
    node = _new(_NodeId)
    node.Identifier = ident
    node.NamespaceIndex = ns
    node.NodeIdType = ua.NodeIdType.TwoByte
    return node


#: The 256 two-byte node ids (namespace 0: reference types, standard type definitions, the null node id),
#: shared by every reference that names them. Nothing here or in the connector mutates a NodeId.
_TWO_BYTE = tuple(_interned(i) for i in range(256))


def _browse_results(data: bytes, pos: int) -> tuple[list[BrowseResult], int]:
    (count,) = _i32(data, pos)
    pos += 4
    if count == -1:
        return [], pos
    if count < 0:
        raise Unsupported(f"{count} results")
    results: list[BrowseResult] = []
    nodeid = _nodeid
    two_byte = _TWO_BYTE
    i32, u16 = _i32, _u16
    ns_len = _ns_len
    new, node_cls, string_kind = _new, _NodeId, ua.NodeIdType.String
    size = len(data)
    for _ in range(count):
        (status,) = _u32(data, pos)
        cp, pos = _bytestring(data, pos + 4)
        (n,) = i32(data, pos)
        pos += 4
        refs: list[Ref] = []
        if n > 0:
            append = refs.append
            for _ in range(n):
                if data[pos] == 0:  # two-byte: the standard reference types
                    reftype = two_byte[data[pos + 1]]
                    pos += 2
                else:
                    reftype, pos = nodeid(data, pos, False)
                pos += 1  # IsForward
                if data[pos] == 3:  # a string node id without flags: the usual device variable
                    (ns, length) = ns_len(data, pos + 1)
                    start = pos + 7
                    pos = start + length
                    if length < 0 or pos > size:
                        raise Unsupported(f"string node id of length {length} at {start}")
                    target: Any = new(node_cls)
                    target.Identifier = data[start:pos].decode("utf-8", errors="surrogateescape")
                    target.NamespaceIndex = ns
                    target.NodeIdType = string_kind
                else:
                    target, pos = nodeid(data, pos, True)
                (name_ns,) = u16(data, pos)
                (length,) = i32(data, pos + 2)
                pos += 6
                if length >= 0:
                    end = pos + length
                    if end > size:
                        raise Unsupported(f"browse name cut short at {pos}")
                    name: str | None = data[pos:end].decode("utf-8", errors="surrogateescape")
                    pos = end
                elif length == -1:
                    name = None
                else:
                    raise Unsupported(f"browse name of length {length}")
                if data[pos] == 0:  # DisplayName: empty (asked without it)
                    pos += 1
                else:
                    pos = _skip_localized_text(data, pos)
                pos += 4  # NodeClass
                if data[pos] == 0:
                    typedef = two_byte[data[pos + 1]]
                    pos += 2
                else:
                    typedef, pos = nodeid(data, pos, True)
                append(Ref(reftype, target, name, name_ns, typedef))
        elif n < -1:
            raise Unsupported(f"{n} references")
        results.append(BrowseResult(status, cp, refs))
    if pos > size:
        raise Unsupported("BrowseResult cut short")
    return results, pos


def _diagnostics(data: bytes, pos: int) -> None:
    """The DiagnosticInfos array that ends every answer: checked (so that a cut answer is refused), not kept."""
    (count,) = _i32(data, pos)
    pos += 4
    if count < -1:
        raise Unsupported(f"{count} diagnostic infos")
    if count > 0:
        buf = Buffer(data, pos)
        for _ in range(count):
            struct_from_binary(ua.DiagnosticInfo, buf)
        pos = buf.cur_pos
    if pos != len(data):
        raise Unsupported(f"{len(data) - pos} bytes after the answer")


def _body(data: Buffer, expected: int) -> tuple[bytes, int]:
    """The body's bytes and the offset of its first field after the ResponseHeader; raises asyncua's error
    for a bad ServiceResult, as asyncua's own services do."""
    raw = data.copy().read(len(data))
    body = raw if isinstance(raw, bytes) else bytes(raw)
    typeid, pos = _nodeid(body, 0, False)
    if typeid.NamespaceIndex != 0 or typeid.Identifier != expected:
        raise Unsupported(f"answer of type {typeid.to_string()}")
    buf = Buffer(body, pos)
    header = struct_from_binary(ua.ResponseHeader, buf)
    header.ServiceResult.check()
    return body, buf.cur_pos


def decode_browse_response(data: Buffer, *, next_: bool = False, fallback: bool = True) -> list[BrowseResult]:
    """The results of a BrowseResponse (or, with ``next_``, a BrowseNextResponse) body. Without ``fallback``,
    an answer this module would hand to asyncua's decoder raises :class:`Unsupported` instead."""
    expected = _BROWSE_NEXT_RESPONSE if next_ else _BROWSE_RESPONSE
    try:
        body, pos = _body(data, expected)
        results, pos = _browse_results(body, pos)
        _diagnostics(body, pos)
        return results
    except (Unsupported, struct.error, IndexError, ValueError) as exc:
        if not fallback:
            raise Unsupported(f"not decoded here: {_describe(exc)}") from exc
        _fallbacks[0] += 1
    if next_:
        next_response = struct_from_binary(ua.BrowseNextResponse, data.copy())
        next_response.ResponseHeader.ServiceResult.check()
        return [result_of(r) for r in next_response.Parameters.Results or ()]
    response = struct_from_binary(ua.BrowseResponse, data.copy())
    response.ResponseHeader.ServiceResult.check()
    return [result_of(r) for r in response.Results or ()]


def decode_read_response(data: Buffer, *, fallback: bool = True) -> list[Reading]:
    """The results of a ReadResponse body (``fallback`` as for :func:`decode_browse_response`)."""
    try:
        body, pos = _body(data, _READ_RESPONSE)
        (count,) = _i32(body, pos)
        pos += 4
        out: list[Reading] = []
        if count < -1:
            raise Unsupported(f"{count} results")
        append = out.append
        for _ in range(count):
            reading, pos = _data_value(body, pos)
            append(reading)
        _diagnostics(body, pos)
        return out
    except (Unsupported, struct.error, IndexError, ValueError) as exc:
        if not fallback:
            raise Unsupported(f"not decoded here: {_describe(exc)}") from exc
        _fallbacks[0] += 1
    response = struct_from_binary(ua.ReadResponse, data.copy())
    response.ResponseHeader.ServiceResult.check()
    return [reading_of(v) for v in response.Results or ()]


# --- asyncua's objects to the light tuples (the fallback path) --------------------------------------------


def ref_of(ref: ua.ReferenceDescription) -> Ref:
    name = ref.BrowseName
    return Ref(ref.ReferenceTypeId, ref.NodeId, name.Name if name is not None else None,
               name.NamespaceIndex if name is not None else 0, ref.TypeDefinition)


def result_of(result: ua.BrowseResult) -> BrowseResult:
    status = result.StatusCode.value if result.StatusCode is not None else 0
    return BrowseResult(status, result.ContinuationPoint, [ref_of(r) for r in result.References or ()])


def reading_of(value: ua.DataValue) -> Reading:
    return Reading(value.Value.Value if value.Value is not None else None,
                   value.StatusCode.value if value.StatusCode is not None else 0,
                   value.SourceTimestamp, value.ServerTimestamp)


# --- the services -----------------------------------------------------------------------------------------


_ReadValueId = ua.ReadValueId
_DEFAULT_ENCODING = ua.QualifiedName()  # shared: asyncua only reads it when encoding the request


def read_value_ids(nodes: list[ua.NodeId], attribute: int) -> list[ua.ReadValueId]:
    """``ua.ReadValueId(NodeId=n, AttributeId=attribute)`` for each node, the same objects (no IndexRange,
    default DataEncoding) built without a dataclass ``__init__`` and a fresh QualifiedName each."""
    out: list[ua.ReadValueId] = []
    append = out.append
    for node in nodes:
        item = _new(_ReadValueId)
        item.NodeId = node
        item.AttributeId = attribute
        item.IndexRange = None
        item.DataEncoding = _DEFAULT_ENCODING
        append(item)
    return out


def _sender(uaclient: Any) -> Callable[[Any], Any] | None:
    """asyncua's private request path that returns the raw response body (None if this asyncua has none)."""
    send = getattr(uaclient, "_send_request", None)
    return send if callable(send) else None


async def browse(uaclient: Any, params: ua.BrowseParameters) -> list[BrowseResult]:
    send = _sender(uaclient)
    if send is None:
        return [result_of(r) for r in await uaclient.browse(params)]
    request = ua.BrowseRequest()
    request.Parameters = params
    return decode_browse_response(await send(request))


async def browse_next(uaclient: Any, params: ua.BrowseNextParameters) -> list[BrowseResult]:
    send = _sender(uaclient)
    if send is None:
        return [result_of(r) for r in await uaclient.browse_next(params)]
    request = ua.BrowseNextRequest()
    request.Parameters = params
    return decode_browse_response(await send(request), next_=True)


async def read(uaclient: Any, params: ua.ReadParameters) -> list[Reading]:
    send = _sender(uaclient)
    if send is None:
        return [reading_of(v) for v in await uaclient.read(params)]
    request = ua.ReadRequest()
    request.Parameters = params
    return decode_read_response(await send(request))
