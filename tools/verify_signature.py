#!/usr/bin/env python3
"""Verifies metron signatures from docs/signing.md alone (no metron code).

usage: verify_signature.py VECTORS_FILE
Form 2 (the `metron` tag): rebuild the tag's value from the vector's key, stream and sequence
number, rebuild canonical(envelope) from envelope_json and compare with canonical_hex; then read
the expected tag back (form, key id, stream, number, MAC) and verify its truncated MAC.
Form 1 (`metron_sig`, older agents): rebuild canonical(envelope) and check
metron_sig = key_id ":" hex(HMAC-SHA256(key, canonical)). Malformed tag values must be refused.
Prints "N vectors ok".
"""
import base64
import hashlib
import hmac
import json
import re
import struct
import sys

DOMAIN_V1 = b"metron-sig-v1"
DOMAIN_V2 = b"metron-sig-v2"
MAC_BYTES = 16


def lp(data: bytes) -> bytes:
    """A length-prefixed field: u32 big-endian length, then the bytes."""
    return struct.pack(">I", len(data)) + data


def f64(x: float) -> bytes:
    """IEEE-754 bits, big-endian; negative zero is written as positive zero."""
    return struct.pack(">d", 0.0 if x == 0 else x)


def utf8(s: str) -> bytes:
    return s.encode("utf-8")


def sorted_items(m: dict):
    return sorted(m.items(), key=lambda kv: utf8(kv[0]))


def uvarint(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


def read_uvarint(b: bytes) -> tuple:
    """(value, bytes used)"""
    n = shift = 0
    for i, byte in enumerate(b):
        n |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return n, i + 1
    raise ValueError("truncated varint")


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def unb64url(s: str) -> bytes:
    """Strict unpadded base64url: the alphabet only, no padding, and the one spelling of the bytes
    (no bits set past the last byte)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", s) or len(s) % 4 == 1:
        raise ValueError("not unpadded base64url")
    b = base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    if b64url(b) != s:
        raise ValueError("not the one spelling of its bytes")
    return b


def tag_value(key_id, stream, seq, mac) -> str:
    """The metron tag: "2" key_id "." base64url(stream || uvarint(seq) || mac), parts optional."""
    payload = b""
    if stream is not None:
        payload += stream + uvarint(seq)
    if mac is not None:
        payload += mac[:MAC_BYTES]
    return "2" + (key_id or "") + "." + b64url(payload)


def parse_tag(value: str) -> tuple:
    """(key_id or None, stream or None, seq or None, mac or None) of a metron tag value; raises
    ValueError for anything docs/signing.md calls malformed."""
    if not value.startswith("2"):
        raise ValueError("not form 2")
    if "." not in value:
        raise ValueError("no '.' after the key id")
    key_id, payload = value[1:].split(".", 1)
    payload = unb64url(payload)
    mac = None
    if key_id:
        if len(payload) < MAC_BYTES:
            raise ValueError("shorter than a MAC")
        payload, mac = payload[:-MAC_BYTES], payload[-MAC_BYTES:]
    if not payload:
        if mac is None:
            raise ValueError("neither a sequence nor a signature")
        return key_id, None, None, mac
    if len(payload) <= 8:
        raise ValueError("a stream without a number")
    seq, used = read_uvarint(payload[8:])
    if len(payload) != 8 + used or len(uvarint(seq)) != used:
        raise ValueError("the number does not use up the payload in as few bytes as it needs")
    return key_id or None, payload[:8], seq, mac


def canonical(e: dict, form: int, stream=None, seq=None) -> bytes:
    if form == 1:
        out = lp(DOMAIN_V1)
        unsigned = "metron_sig"
    else:
        out = lp(DOMAIN_V2)
        out += b"\x00" if stream is None else b"\x01" + stream + struct.pack(">Q", seq)
        unsigned = "metron"
    out += struct.pack(">q", e["timestamp"])
    out += lp(utf8(e["source_id"])) + lp(utf8(e["instance_id"]))
    tags = {k: v for k, v in e["tags"].items() if k != unsigned}
    out += struct.pack(">I", len(tags))
    for k, v in sorted_items(tags):
        out += lp(utf8(k)) + lp(utf8(v))
    dep = e["deprecated_tags"]
    out += struct.pack(">I", len(dep))
    for k, v in sorted_items(dep):
        out += lp(utf8(k))
        if "text" in v:
            out += b"\x01" + lp(utf8(v["text"]))
        elif "integer" in v:
            out += b"\x02" + struct.pack(">q", v["integer"])
        elif "decimal" in v:
            out += b"\x03" + f64(v["decimal"])
        else:
            out += b"\x00"
    m = e["message"]
    if m is None:
        out += b"\x00"
    elif "log" in m:
        out += b"\x01" + lp(bytes.fromhex(m["log"]["payload_hex"]))
        out += struct.pack(">I", m["log"]["type"] & 0xFFFFFFFF)
    elif "counter" in m:
        c = m["counter"]
        out += b"\x02" + lp(utf8(c["name"])) + struct.pack(">QQ", c["delta"], c["total"])
    elif "gauge" in m:
        metrics = m["gauge"]["metrics"]
        out += b"\x03" + struct.pack(">I", len(metrics))
        for k, v in sorted_items(metrics):
            out += lp(utf8(k)) + lp(utf8(v["unit"])) + f64(v["value"])
    elif "timer" in m:
        t = m["timer"]
        out += b"\x04" + lp(utf8(t["name"])) + struct.pack(">qq", t["start"], t["stop"])
    elif "event" in m:
        ev = m["event"]
        out += b"\x05" + lp(utf8(ev["title"])) + lp(utf8(ev["body"]))
    else:
        raise ValueError(f"unknown message {m}")
    return out


def blocks(text: str):
    for block in text.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            if line.startswith("#") or ": " not in line:
                continue
            k, v = line.split(": ", 1)
            fields[k] = v
        if fields:
            yield fields


def check_v1(v: dict) -> str:
    canon = canonical(json.loads(v["envelope_json"]), 1)
    if canon.hex() != v["canonical_hex"]:
        return "canonical form differs"
    mac = hmac.new(bytes.fromhex(v["key_hex"]), canon, hashlib.sha256).hexdigest()
    if f"{v['key_id']}:{mac}" != v["metron_sig"]:
        return "signature differs"
    return ""


def check_v2(v: dict) -> str:
    e = json.loads(v["envelope_json"])
    stream = bytes.fromhex(v["stream_hex"]) if "stream_hex" in v else None
    seq = int(v["seq"]) if "seq" in v else None
    key_id = v.get("key_id")
    mac = None
    if key_id:
        canon = canonical(e, 2, stream, seq)
        if canon.hex() != v["canonical_hex"]:
            return "canonical form differs"
        mac = hmac.new(bytes.fromhex(v["key_hex"]), canon, hashlib.sha256).digest()
    if tag_value(key_id, stream, seq, mac) != v["metron"]:
        return "tag differs"
    # A receiver's side: read the tag, then verify what it says.
    got_id, got_stream, got_seq, got_mac = parse_tag(v["metron"])
    if (got_id, got_stream, got_seq) != (key_id, stream, seq):
        return "tag reads back differently"
    if got_mac is not None:
        want = hmac.new(bytes.fromhex(v["key_hex"]), canonical(e, 2, got_stream, got_seq),
                        hashlib.sha256).digest()[:MAC_BYTES]
        if not hmac.compare_digest(want, got_mac):
            return "MAC does not verify"
    return ""


def check_malformed(v: dict) -> str:
    try:
        parse_tag(v["metron"])
    except ValueError:
        return ""
    return "a malformed tag was accepted"


def main(path: str) -> int:
    n = 0
    checks = {"1": check_v1, "2": check_v2, "malformed": check_malformed}
    with open(path, encoding="utf-8") as f:
        for v in blocks(f.read()):
            problem = checks[v["form"]](v)
            if problem:
                print(f"{v['name']} (form {v['form']}): {problem}")
                return 1
            n += 1
    print(f"{n} vectors ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
