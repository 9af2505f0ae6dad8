#!/usr/bin/env python3
"""Writes encoded-response test vectors with Mercurial 5.6.1's own framing code.

Run from this directory (the vectors are committed; rerun only to change them):

  PYTHONPATH=<hg-5.6.1>/usr/lib/python3/dist-packages:<python3-zstandard>/usr/lib/python3/dist-packages \
    HGMODULEPOLICY=py python3 gen.py

Mercurial 5.6.1's own zstd module is a C extension built for Python 3.9; Debian's
python3-zstandard (0.20, the same python-zstandard API Mercurial vendors) stands in for it, so
the zstd-8mb vectors come from Mercurial's zstd8mbencoder (level 3, flush-block per command).

Each vector NAME has:
  NAME.request  the client's request body (clientreactor: sender-protocol-settings, commands)
  NAME.frames   the server's response body (serverreactor, as `hg serve` sends it)
and small.cbor, big.cbor are the object bytes of the two answers (what follows the status):
the *-small vectors answer with small, *-big and *-two (last command) with big.
"""
import random
import sys

import zstandard

sys.modules['mercurial.zstd'] = zstandard

from mercurial import ui as uimod
from mercurial import wireprotoframing as wf
from mercurial.utils import cborutil

ui = uimod.ui()


def objects(seed, n):
    """A filesdata-shaped answer: a header, then per file a header and revisions of varied
    compressibility (text, random bytes, one larger than a frame)."""
    rng = random.Random(seed)
    out = [{b'totalitems': n, b'totalpaths': n}]
    for i in range(n):
        out.append({b'path': b'src/file%03d.txt' % i, b'totalitems': 1})
        if i % 5 == 4:
            data = bytes(rng.getrandbits(8) for _ in range(3000 + 37 * i))
        elif i == 7:
            data = b''.join(b'line %d of a large file\n' % j for j in range(4000))
        else:
            data = b''.join(b'file %d line %d: %x\n' % (i, j, rng.getrandbits(64)) for j in range(1 + rng.randrange(80)))
        out.append({b'node': bytes(rng.getrandbits(8) for _ in range(20)),
                    b'parents': [b'\0' * 20, b'\0' * 20],
                    b'fieldsfollowing': [[b'revision', len(data)]]})
        out.append(data)
    return out


def encode(objs):
    return b''.join(b''.join(cborutil.streamencode(o)) for o in objs)


def vector(name, encoders, commands):
    """commands: list of (request id, command name, args, objects)."""
    client = wf.clientreactor(ui, hasmultiplesend=False, buffersends=True,
                              clientcontentencoders=encoders)
    for _, cmd, args, _ in commands:
        client.callcommand(cmd, args)
    _, meta = client.flushcommands()
    request = b''.join(bytes(f) for f in meta[b'framegen'])

    server = wf.serverreactor(ui, deferoutput=True)
    outstream = None
    import io
    fh = io.BytesIO(request)
    byid = {rid: objs for rid, _, _, objs in commands}
    while True:
        frame = wf.readframe(fh)
        if frame is None:
            break
        action, meta = server.onframerecv(frame)
        if action == b'runcommand':
            if outstream is None:
                outstream = server.makeoutputstream()
            server.oncommandresponsereadyobjects(outstream, meta[b'requestid'], iter(byid[meta[b'requestid']]))
        elif action != b'wantframe':
            raise SystemExit('%s: unexpected action %s %r' % (name, action, meta))
    action, meta = server.oninputeof()
    assert action == b'sendframes', action
    response = b''.join(bytes(f) for f in meta[b'framegen'])
    with open(name + '.request', 'wb') as f:
        f.write(request)
    with open(name + '.frames', 'wb') as f:
        f.write(response)
    print(name, len(request), len(response), len(encode(commands[-1][3])))


def filesdata(n):
    return {b'revisions': [{b'type': b'changesetexplicit', b'nodes': [b'\x01' * 20] * n}],
            b'fields': {b'parents', b'revision'}, b'haveparents': True}


small = objects(1, 3)
big = objects(2, 40)
for name, objs in (('small', small), ('big', big)):
    with open(name + '.cbor', 'wb') as f:
        f.write(encode(objs))
for enc in (b'zstd-8mb', b'zlib', b'identity'):
    tag = enc.decode().replace('-', '')
    order = [e for e in [b'zstd-8mb', b'zlib', b'identity'] if e == enc or e == b'identity']
    vector('%s-small' % tag, order, [(1, b'filesdata', filesdata(3), small)])
    vector('%s-big' % tag, order, [(1, b'filesdata', filesdata(40), big)])
    # Two commands in one request (multirequest): one stream, one compression context.
    vector('%s-two' % tag, order, [(1, b'filesdata', filesdata(3), small), (3, b'filesdata', filesdata(40), big)])
# The full offer of a client that has zstd: the server picks zstd-8mb.
vector('offer-all', [b'zstd-8mb', b'zlib', b'identity'], [(1, b'filesdata', filesdata(3), small)])
