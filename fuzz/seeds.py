#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs from the checked-in test vectors: every v1 datagram of
tests/vectors/v1_to_v2.txt, and every envelope of tests/vectors/signing.txt as a one-envelope
EnvelopeBatch, plus one batch of all of them. libFuzzer mutates these (and what it finds) into
the corpus; `cargo fuzz cmin` keeps the corpus small."""
import hashlib, os, re, sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def hexes(path, key):
    text = open(os.path.join(root, path)).read()
    return [bytes.fromhex(h) for h in re.findall(r"^%s:\s*([0-9a-f]*)\s*$" % key, text, re.M)]

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)

def entry(envelope):
    return b"\x0a" + varint(len(envelope)) + envelope

def write(target, inputs):
    d = os.path.join(root, "fuzz", "corpus", target)
    os.makedirs(d, exist_ok=True)
    for data in inputs:
        name = "seed-" + hashlib.sha1(data).hexdigest()[:16]
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    print(f"{target}: {len(inputs)} seeds", file=sys.stderr)

envelopes = hexes("tests/vectors/signing.txt", "envelope_pb_hex")
write("v2_batch", [entry(e) for e in envelopes] + [b"".join(entry(e) for e in envelopes)])
write("v1_datagram", hexes("tests/vectors/v1_to_v2.txt", "v1_pb_hex"))
