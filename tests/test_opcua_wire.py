"""connectors.opcua.wire: the hand-written Browse/BrowseNext/Read decoder against asyncua's own encoder and
decoder (real ua.BrowseResponse / ua.ReadResponse objects encoded by asyncua, decoded both ways, compared),
and against a real asyncua server (simulator.opcua_plant) over loopback."""

from __future__ import annotations

import struct
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio
from asyncua import Client, ua
from asyncua.common.utils import Buffer
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.ua_binary import struct_from_binary, struct_to_binary
from asyncua.ua.uaerrors import UaStatusCodeError

from connectors.opcua import wire
from simulator.mosquitto import free_port
from simulator.opcua_plant import OpcuaPlant
from simulator.plant import PlantShape, make_plant

in_module_loop = pytest.mark.asyncio(loop_scope="module")

GUID = uuid.UUID("72962b91-fa75-4ae6-8d28-b404dc7daf63")
T1 = datetime(2026, 11, 26, 12, 30, 15, 123456, tzinfo=UTC)
T2 = datetime(2026, 11, 26, 12, 30, 16, 654321, tzinfo=UTC)

#: Every NodeId encoding, and ExpandedNodeIds with the namespace URI and server index flags.
NODE_IDS: list[ua.NodeId] = [
    ua.NodeId(ua.Int32(47)),  # two-byte
    ua.NodeId(ua.Int32(0)),  # the null node id, two-byte
    ua.NodeId(ua.Int32(1002), ua.Int16(3)),  # four-byte
    ua.NodeId(ua.Int32(255), ua.Int16(0)),  # two-byte at its limit
    ua.NodeId(ua.Int32(256), ua.Int16(0)),  # four-byte
    ua.NodeId(ua.Int32(70_000), ua.Int16(2)),  # numeric (identifier above 65535)
    ua.NodeId(ua.Int32(5), ua.Int16(300)),  # numeric (namespace above 255)
    ua.NodeId(ua.String("plant.device-0042.Value"), ua.Int16(2)),
    ua.NodeId(ua.String("设备/温度 ✓"), ua.Int16(7)),  # multi-byte UTF-8
    ua.NodeId(ua.String(""), ua.Int16(2)),  # an empty (not null) string
    ua.NodeId(GUID, ua.Int16(4)),
    ua.NodeId(ua.ByteString(b"\x00\xffopaque\x80"), ua.Int16(5)),
    ua.NodeId(ua.ByteString(b""), ua.Int16(5)),
    ua.ExpandedNodeId(ua.Int32(42), ua.Int16(0), ua.NodeIdType.TwoByte, ua.String("urn:other:ns"), ua.Int32(0)),
    ua.ExpandedNodeId(ua.String("remote"), ua.Int16(2), ua.NodeIdType.String, None, ua.Int32(3)),
    ua.ExpandedNodeId(GUID, ua.Int16(1), ua.NodeIdType.Guid, ua.String("urn:x"), ua.Int32(7)),
    ua.ExpandedNodeId(ua.Int32(100_000), ua.Int16(9), ua.NodeIdType.Numeric, ua.String("urn:y"), None),
]
PLAIN_NODE_IDS = [n for n in NODE_IDS if not isinstance(n, ua.ExpandedNodeId)]


def node_key(node: ua.NodeId) -> tuple[Any, ...]:
    """Everything a NodeId carries (NodeId equality alone ignores the type and the expanded fields)."""
    return (type(node), node.Identifier, type(node.Identifier), node.NamespaceIndex, node.NodeIdType,
            getattr(node, "NamespaceUri", None), getattr(node, "ServerIndex", None))


def ref_key(ref: wire.Ref) -> tuple[Any, ...]:
    return (node_key(ref.reference_type), node_key(ref.node_id), ref.browse_name, ref.browse_name_ns,
            node_key(ref.type_definition))


def reference(target: ua.NodeId, *, reftype: ua.NodeId | None = None, typedef: ua.NodeId | None = None,
              name: str | None = "Value", name_ns: int = 2,
              display: ua.LocalizedText | None = None) -> ua.ReferenceDescription:
    return ua.ReferenceDescription(
        ReferenceTypeId=reftype if reftype is not None else ua.NodeId(ua.Int32(ObjectIds.HasComponent)),
        IsForward=True,
        NodeId=target if isinstance(target, ua.ExpandedNodeId) else ua.ExpandedNodeId(
            target.Identifier, target.NamespaceIndex, target.NodeIdType),
        BrowseName=ua.QualifiedName(name, ua.Int16(name_ns)),
        DisplayName=display if display is not None else ua.LocalizedText(),
        NodeClass=ua.NodeClass.Variable,
        TypeDefinition=typedef if typedef is not None else ua.ExpandedNodeId(),
    )


def browse_results() -> list[ua.BrowseResult]:
    refs = [reference(n) for n in NODE_IDS]
    refs += [reference(PLAIN_NODE_IDS[2], reftype=n) for n in PLAIN_NODE_IDS]  # odd reference types too
    refs += [reference(PLAIN_NODE_IDS[7], typedef=n) for n in NODE_IDS]
    refs += [
        reference(PLAIN_NODE_IDS[7], name=None),  # a null browse name
        reference(PLAIN_NODE_IDS[7], name="", name_ns=0),
        reference(PLAIN_NODE_IDS[7], name="Hersteller Ä", name_ns=32767),
        reference(PLAIN_NODE_IDS[7], display=ua.LocalizedText("Manufacturer")),
        reference(PLAIN_NODE_IDS[7], display=ua.LocalizedText("Hersteller", "de-DE")),
        reference(PLAIN_NODE_IDS[7], display=ua.LocalizedText(None, "en")),
    ]
    return [
        ua.BrowseResult(References=refs[:20]),
        ua.BrowseResult(ContinuationPoint=b"cp\x00\x01", References=refs[20:]),
        ua.BrowseResult(StatusCode=ua.StatusCode(ua.UInt32(ua.StatusCodes.BadNodeIdUnknown))),
        ua.BrowseResult(References=[]),
        ua.BrowseResult(StatusCode=ua.StatusCode(ua.UInt32(ua.StatusCodes.GoodMoreData)), References=refs[:1]),
    ]


def encoded(response: Any) -> Buffer:
    return Buffer(struct_to_binary(response))


def asyncua_results(response_type: type, data: Buffer) -> list[Any]:
    response = struct_from_binary(response_type, data.copy())
    if response_type is ua.BrowseNextResponse:
        return list(response.Parameters.Results or [])
    return list(response.Results or [])


def assert_same_browse(ours: list[wire.BrowseResult], theirs: list[ua.BrowseResult]) -> None:
    assert len(ours) == len(theirs)
    for mine, reference_result in zip(ours, theirs, strict=True):
        expected = wire.result_of(reference_result)
        assert (mine.status, mine.continuation_point) == (expected.status, expected.continuation_point)
        assert [ref_key(r) for r in mine.references] == [ref_key(r) for r in expected.references]


# --- Browse and BrowseNext --------------------------------------------------------------------------------


def test_browse_response_matches_asyncua_for_every_node_id_encoding() -> None:
    data = encoded(ua.BrowseResponse(Results=browse_results()))
    ours = wire.decode_browse_response(data, fallback=False)
    assert_same_browse(ours, asyncua_results(ua.BrowseResponse, data))
    # spot checks that do not lean on asyncua's decoder
    assert ours[0].references[0].reference_type == ua.NodeId(ua.Int32(ObjectIds.HasComponent))
    targets = [r.node_id for r in ours[0].references[: len(NODE_IDS)]]
    assert [(t.Identifier, t.NamespaceIndex, t.NodeIdType) for t in targets] == [
        (n.Identifier, n.NamespaceIndex, n.NodeIdType) for n in NODE_IDS]
    assert isinstance(targets[-1], ua.ExpandedNodeId) and targets[-1].NamespaceUri == "urn:y"
    assert isinstance(targets[-2], ua.ExpandedNodeId) and targets[-2].ServerIndex == 7
    assert targets[10].Identifier == GUID and targets[11].Identifier == b"\x00\xffopaque\x80"
    assert ours[1].continuation_point == b"cp\x00\x01"
    assert ours[2].status == ua.StatusCodes.BadNodeIdUnknown and ours[2].references == []


def test_browse_next_response_matches_asyncua() -> None:
    response = ua.BrowseNextResponse(Parameters=ua.BrowseNextResult(Results=browse_results()))
    data = encoded(response)
    ours = wire.decode_browse_response(data, next_=True, fallback=False)
    assert_same_browse(ours, asyncua_results(ua.BrowseNextResponse, data))


def test_null_result_and_reference_arrays() -> None:
    for results in (None, [ua.BrowseResult(References=None)]):  # type: ignore[list-item]
        data = encoded(ua.BrowseResponse(Results=results))
        ours = wire.decode_browse_response(data, fallback=False)
        assert_same_browse(ours, asyncua_results(ua.BrowseResponse, data))


def test_a_node_id_flagged_as_expanded_where_a_plain_one_belongs_goes_to_asyncua() -> None:
    good = encoded(ua.BrowseResponse(Results=[ua.BrowseResult(References=[reference(PLAIN_NODE_IDS[2])])]))
    raw = bytearray(bytes(good))
    at = raw.index(bytes([0x00, ObjectIds.HasComponent, 0x01]))  # the ReferenceTypeId, then IsForward
    raw[at] = 0x40  # two-byte with the server index flag ...
    raw[at + 2 : at + 2] = struct.pack("<I", 9)  # ... and the index (IsForward follows it)
    data = Buffer(bytes(raw))
    with pytest.raises(wire.Unsupported):
        wire.decode_browse_response(data, fallback=False)
    assert_same_browse(wire.decode_browse_response(data), asyncua_results(ua.BrowseResponse, data))


def test_bad_service_result_raises_like_asyncua() -> None:
    header = ua.ResponseHeader(ServiceResult=ua.StatusCode(ua.UInt32(ua.StatusCodes.BadTooManyOperations)))
    for response, next_ in ((ua.BrowseResponse(ResponseHeader=header), False),
                            (ua.BrowseNextResponse(ResponseHeader=header), True)):
        with pytest.raises(UaStatusCodeError) as caught:
            wire.decode_browse_response(encoded(response), next_=next_)
        assert caught.value.code == ua.StatusCodes.BadTooManyOperations
    with pytest.raises(UaStatusCodeError):
        wire.decode_read_response(encoded(ua.ReadResponse(ResponseHeader=header)))


def test_truncated_answers_fail_instead_of_returning_partial_results() -> None:
    full = bytes(encoded(ua.BrowseResponse(Results=browse_results())))
    for cut in (len(full) - 1, len(full) // 2, 40):
        with pytest.raises(Exception):  # noqa: B017 - asyncua's decoder, the fallback, decides the error
            wire.decode_browse_response(Buffer(full[:cut]))
    values = bytes(encoded(ua.ReadResponse(Results=[ua.DataValue(ua.Variant("text"))] * 3)))
    with pytest.raises(Exception):  # noqa: B017
        wire.decode_read_response(Buffer(values[:-3]))


def test_an_answer_of_another_type_is_refused_by_the_fast_path() -> None:
    data = encoded(ua.ReadResponse(Results=[ua.DataValue(ua.Variant(1.0))]))
    with pytest.raises(wire.Unsupported):
        wire.decode_browse_response(data, fallback=False)


# --- Read -------------------------------------------------------------------------------------------------


def variants() -> list[ua.Variant]:
    vt = ua.VariantType
    return [
        ua.Variant(True, vt.Boolean), ua.Variant(False, vt.Boolean),
        ua.Variant(-5, vt.SByte), ua.Variant(200, vt.Byte),
        ua.Variant(-30000, vt.Int16), ua.Variant(60000, vt.UInt16),
        ua.Variant(-2_000_000_000, vt.Int32), ua.Variant(4_000_000_000, vt.UInt32),
        ua.Variant(-(2 ** 62), vt.Int64), ua.Variant(2 ** 63 + 5, vt.UInt64),
        ua.Variant(1.5, vt.Float), ua.Variant(-2.25e300, vt.Double),
        ua.Variant("Siemens AG", vt.String), ua.Variant("", vt.String), ua.Variant(None, vt.String),
        ua.Variant("温度 ✓", vt.String),
        ua.Variant(T1, vt.DateTime),
        ua.Variant(datetime(1601, 1, 1, tzinfo=UTC), vt.DateTime),
        ua.Variant(b"\x00\x01\xff", vt.ByteString), ua.Variant(None, vt.ByteString),
        ua.Variant(ua.LocalizedText("Model X", "en"), vt.LocalizedText),
        ua.Variant(ua.LocalizedText("Modell"), vt.LocalizedText),
        ua.Variant(ua.LocalizedText(), vt.LocalizedText),
        ua.Variant(None, vt.Null),
        # arrays
        ua.Variant([1, -2, 3], vt.Int32), ua.Variant([], vt.Int32),
        ua.Variant([0.5, 1.5], vt.Double), ua.Variant([True, False], vt.Boolean),
        ua.Variant(["http://opcfoundation.org/UA/", "urn:tianping:plant", None], vt.String),
        ua.Variant([T1, T2], vt.DateTime),
        ua.Variant([ua.LocalizedText("a", "en"), ua.LocalizedText("b")], vt.LocalizedText),
        ua.Variant([b"x", b""], vt.ByteString),
        # types left to asyncua's decoder
        ua.Variant(ua.QualifiedName("DeviceType", ua.Int16(3)), vt.QualifiedName),
        ua.Variant(ua.NodeId(ua.String("n"), ua.Int16(2)), vt.NodeId),
        ua.Variant(ua.StatusCode(ua.UInt32(ua.StatusCodes.BadNoCommunication)), vt.StatusCode),
        ua.Variant(GUID, vt.Guid),
        ua.Variant([[1, 2], [3, 4]], vt.Int32, [2, 2]),  # multi-dimensional
        ua.Variant(ua.Range(1.0, 2.0), vt.ExtensionObject),
    ]


def data_values() -> list[ua.DataValue]:
    good, bad = ua.StatusCode(), ua.StatusCode(ua.UInt32(ua.StatusCodes.BadNoCommunication))
    uncertain = ua.StatusCode(ua.UInt32(ua.StatusCodes.UncertainLastUsableValue))
    out = [ua.DataValue(v, StatusCode=good, SourceTimestamp=T1, ServerTimestamp=T2) for v in variants()]
    out += [
        ua.DataValue(ua.Variant(7, ua.VariantType.Int32), StatusCode=None),  # mask: value only
        ua.DataValue(None, StatusCode=bad),  # mask: status only
        ua.DataValue(None, StatusCode=None),  # mask: nothing
        ua.DataValue(ua.Variant(1.0), StatusCode=uncertain, SourceTimestamp=T1),
        ua.DataValue(ua.Variant(1.0), ServerTimestamp=T2),
        ua.DataValue(ua.Variant(1.0), SourceTimestamp=T1, SourcePicoseconds=ua.UInt16(1234)),
        ua.DataValue(ua.Variant(1.0), ServerTimestamp=T2, ServerPicoseconds=ua.UInt16(77)),
        ua.DataValue(ua.Variant(1.0), SourceTimestamp=T1, ServerTimestamp=T2, ServerPicoseconds=ua.UInt16(9)),
        ua.DataValue(ua.Variant("x"), SourceTimestamp=datetime(9999, 12, 31, 23, 59, tzinfo=UTC)),
    ]
    return out


def reading_key(reading: wire.Reading) -> tuple[Any, ...]:
    value = reading.value
    return (type(value), value, reading.status, reading.source_timestamp, reading.server_timestamp)


def test_read_response_matches_asyncua_for_every_variant_and_mask() -> None:
    values = data_values()
    data = encoded(ua.ReadResponse(Results=values))
    ours = wire.decode_read_response(data, fallback=False)
    theirs = [wire.reading_of(v) for v in asyncua_results(ua.ReadResponse, data)]
    assert [reading_key(r) for r in ours] == [reading_key(r) for r in theirs]
    # spot checks that do not lean on asyncua's decoder
    assert ours[0] == wire.Reading(True, 0, T1, T2)
    assert ours[12].value == "Siemens AG" and ours[20].value == ua.LocalizedText("Model X", "en")
    assert ours[len(variants())].status == 0 and ours[len(variants()) + 1].status == ua.StatusCodes.BadNoCommunication


def test_null_results_array() -> None:
    assert wire.decode_read_response(encoded(ua.ReadResponse(Results=None)), fallback=False) == []  # type: ignore[arg-type]


def test_picoseconds_follow_the_specification_order() -> None:
    """Part 6: SourceTimestamp, SourcePicoseconds, ServerTimestamp, ServerPicoseconds (built by hand: asyncua
    writes both timestamps first, which differs exactly in this case)."""
    header = struct_to_binary(ua.ReadResponse(Results=[]))[:-8]  # TypeId + ResponseHeader (no result arrays)
    stamp = struct.Struct("<q").pack
    dv = (bytes([0x3F, 0x0B]) + struct.pack("<d", 2.5) + struct.pack("<I", 0)
          + stamp(ua.datetime_to_win_epoch(T1)) + struct.pack("<H", 11)
          + stamp(ua.datetime_to_win_epoch(T2)) + struct.pack("<H", 22))
    body = header + struct.pack("<i", 2) + dv + dv + struct.pack("<i", -1)
    ours = wire.decode_read_response(Buffer(body), fallback=False)
    assert ours == [wire.Reading(2.5, 0, T1, T2)] * 2


def test_unknown_data_value_mask_bits_go_to_asyncua() -> None:
    body = struct_to_binary(ua.ReadResponse(Results=[ua.DataValue(ua.Variant(3, ua.VariantType.Int32),
                                                                  StatusCode=None)]))
    at = len(body) - 4 - 6  # mask, variant type byte, Int32; then the DiagnosticInfos array
    assert body[at] == 0x01 and body[at + 1] == ua.VariantType.Int32.value
    odd = body[:at] + bytes([0x41]) + body[at + 1 :]  # bit 6: unknown to this module
    assert wire.decode_read_response(Buffer(odd)) == [wire.Reading(3, 0, None, None)]


# --- against a real server, through asyncua's request path (security: see test_opcua_security.py) -------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plant() -> AsyncIterator[OpcuaPlant]:
    spec = make_plant(PlantShape(opcua=6, modbus=0, mqtt=0, opcua_and_mqtt=0, modbus_and_opcua=0, silent=1))
    async with OpcuaPlant(spec, port=free_port(), update_interval_s=0.2) as running:
        yield running


@in_module_loop
async def test_real_server_answers_decode_like_asyncua(plant: OpcuaPlant) -> None:
    async with Client(plant.endpoint, timeout=10) as client:
        uaclient = client.uaclient
        objects = ua.NodeId(ua.Int32(ObjectIds.ObjectsFolder))
        params = ua.BrowseParameters(NodesToBrowse=[ua.BrowseDescription(
            NodeId=objects, BrowseDirection=ua.BrowseDirection.Forward, ReferenceTypeId=ua.NodeId(),
            IncludeSubtypes=True, NodeClassMask=0, ResultMask=int(ua.BrowseResultMask.All))])
        request = ua.BrowseRequest()
        request.Parameters = params
        raw = await uaclient._send_request(request)
        ours = wire.decode_browse_response(raw, fallback=False)
        assert_same_browse(ours, asyncua_results(ua.BrowseResponse, raw))
        assert ours == await wire.browse(uaclient, params)
        names = {r.browse_name for r in ours[0].references}
        assert {"Server", "DeviceSet"} <= names

        device_set = next(r.node_id for r in ours[0].references if r.browse_name == "DeviceSet")
        devices = (await wire.browse(uaclient, ua.BrowseParameters(NodesToBrowse=[ua.BrowseDescription(
            NodeId=device_set, BrowseDirection=ua.BrowseDirection.Forward, ReferenceTypeId=ua.NodeId(),
            IncludeSubtypes=True, NodeClassMask=int(ua.NodeClass.Object), ResultMask=63)])))[0].references
        assert len(devices) >= 6
        variables = await wire.browse(uaclient, ua.BrowseParameters(NodesToBrowse=[ua.BrowseDescription(
            NodeId=d.node_id, BrowseDirection=ua.BrowseDirection.Forward, ReferenceTypeId=ua.NodeId(),
            IncludeSubtypes=True, NodeClassMask=int(ua.NodeClass.Variable), ResultMask=63) for d in devices]))
        nodes = [r.node_id for result in variables for r in result.references]
        nodes.append(ua.NodeId(ua.Int32(ObjectIds.Server_NamespaceArray)))
        nodes.append(ua.NodeId(ua.String("no such node"), ua.Int16(2)))
        read = ua.ReadParameters(TimestampsToReturn=ua.TimestampsToReturn.Both,
                                 NodesToRead=[ua.ReadValueId(NodeId=n, AttributeId=ua.AttributeIds.Value)
                                              for n in nodes])
        request = ua.ReadRequest()
        request.Parameters = read
        raw = await uaclient._send_request(request)
        ours_read = wire.decode_read_response(raw, fallback=False)
        theirs = [wire.reading_of(v) for v in asyncua_results(ua.ReadResponse, raw)]
        assert [reading_key(r) for r in ours_read] == [reading_key(r) for r in theirs]
        assert ours_read[-1].status == ua.StatusCodes.BadNodeIdUnknown
        assert "urn:tianping:plant" in str(ours_read[-2].value) or isinstance(ours_read[-2].value, list)
        assert [reading_key(r) for r in await wire.read(uaclient, read)][:-1] != []


def test_read_value_ids_encode_like_asyncuas_own() -> None:
    nodes = PLAIN_NODE_IDS
    ours = wire.read_value_ids(nodes, ua.AttributeIds.BrowseName)
    theirs = [ua.ReadValueId(NodeId=n, AttributeId=ua.AttributeIds.BrowseName) for n in nodes]
    assert ours == theirs
    params = ua.ReadParameters(TimestampsToReturn=ua.TimestampsToReturn.Neither, NodesToRead=ours)
    assert struct_to_binary(params) == struct_to_binary(
        ua.ReadParameters(TimestampsToReturn=ua.TimestampsToReturn.Neither, NodesToRead=theirs))


def test_browse_name_namespace_is_unsigned_and_bad_display_name_lengths_are_refused() -> None:
    ref = reference(PLAIN_NODE_IDS[7], name="Model", name_ns=0x1234, display=ua.LocalizedText("Model"))
    raw = bytearray(bytes(encoded(ua.BrowseResponse(Results=[ua.BrowseResult(References=[ref])]))))
    at = raw.index(struct.pack("<H", 0x1234) + struct.pack("<i", 5) + b"Model")
    raw[at : at + 2] = struct.pack("<H", 40000)  # Part 6: a UInt16
    ours = wire.decode_browse_response(Buffer(bytes(raw)), fallback=False)
    assert ours[0].references[0].browse_name_ns == 40000 and ours[0].references[0].browse_name == "Model"
    display = raw.index(bytes([0x02]) + struct.pack("<i", 5) + b"Model", at + 11)  # DisplayName: text only
    raw[display + 1 : display + 5] = struct.pack("<i", -7)
    with pytest.raises(wire.Unsupported):
        wire.decode_browse_response(Buffer(bytes(raw)), fallback=False)
