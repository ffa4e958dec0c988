#!/usr/bin/env python3
"""Verifies metron signatures from the README's description alone (no metron code).

usage: verify_signature.py VECTORS_FILE
For every vector: rebuild canonical(envelope) from envelope_json, compare with canonical_hex, and
check metron_sig = key_id ":" hex(HMAC-SHA256(key, canonical)). Prints "N vectors ok".
"""
import hashlib
import hmac
import json
import struct
import sys

DOMAIN = b"metron-sig-v1"


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


def canonical(e: dict) -> bytes:
    out = lp(DOMAIN)
    out += struct.pack(">q", e["timestamp"])
    out += lp(utf8(e["source_id"])) + lp(utf8(e["instance_id"]))
    tags = {k: v for k, v in e["tags"].items() if k != "metron_sig"}
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


def main(path: str) -> int:
    n = 0
    with open(path, encoding="utf-8") as f:
        for v in blocks(f.read()):
            canon = canonical(json.loads(v["envelope_json"]))
            if canon.hex() != v["canonical_hex"]:
                print(f"{v['name']}: canonical form differs")
                return 1
            mac = hmac.new(bytes.fromhex(v["key_hex"]), canon, hashlib.sha256).hexdigest()
            if f"{v['key_id']}:{mac}" != v["metron_sig"]:
                print(f"{v['name']}: signature differs")
                return 1
            n += 1
    print(f"{n} vectors ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
