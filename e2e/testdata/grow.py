# An hg extension for the end-to-end tests: `hg grow COUNT` adds COUNT changesets to the repository
# in one process (a commit per process costs the pure-Python 5.6.1 a second each), deterministically
# from --seed. The first changeset of an empty repository writes --files text files of --lines
# lines and --big binary files of --bigsize random bytes; every later one edits --edits text files
# (a line replaced, --add lines inserted), and every fifth adds a small file.
from mercurial import context, node as nodemod, registrar
import random

cmdtable = {}
command = registrar.command(cmdtable)


def line(rng, i):
    return b'%d: %016x %08x %s\n' % (i, rng.getrandbits(64), rng.getrandbits(32), b'x' * rng.randrange(40))


@command(b'grow', [(b'', b'seed', 1, b'seed'), (b'', b'files', 200, b'text files of the first changeset'),
                   (b'', b'lines', 40, b'lines of each text file'),
                   (b'', b'big', 0, b'binary files of the first changeset'), (b'', b'bigsize', 0, b'their size'),
                   (b'', b'edits', 3, b'files each later changeset edits'), (b'', b'add', 8, b'lines each edit adds')],
         b'COUNT', norepo=False)
def grow(ui, repo, count, **opts):
    rng = random.Random(opts['seed'])
    with repo.wlock(), repo.lock(), repo.transaction(b'grow'):
        tip = repo[b'tip']
        files = {f: tip[f].data() for f in tip.manifest()}
        rev = len(repo)
        p1 = tip.node()
        for n in range(int(count)):
            if rev == 0:
                changed = {}
                for i in range(opts['files']):
                    changed[b'src/dir%02d/file%04d.txt' % (i % 23, i)] = b''.join(line(rng, j) for j in range(opts['lines']))
                for i in range(opts['big']):
                    changed[b'assets/blob%02d.bin' % i] = rng.getrandbits(8 * opts['bigsize']).to_bytes(opts['bigsize'], 'little')
            else:
                changed = {}
                text = sorted(f for f in files if f.endswith(b'.txt'))
                for f in rng.sample(text, opts['edits']):
                    lines = files[f].splitlines(True)
                    lines[rng.randrange(len(lines))] = line(rng, rev)
                    for k in range(opts['add']):
                        lines.insert(rng.randrange(len(lines) + 1), line(rng, rev + k))
                    changed[f] = b''.join(lines)
                if rev % 5 == 0:
                    changed[b'src/new/file%05d.txt' % rev] = b''.join(line(rng, j) for j in range(10))
            files.update(changed)

            def filectx(repo, memctx, f, changed=changed):
                return context.memfilectx(repo, memctx, f, changed[f])

            ctx = context.memctx(repo, (p1, nodemod.nullid), b'changeset %d' % rev, sorted(changed), filectx,
                                 user=b'detour <detour@localhost>', date=(1600000000 + rev, 0))
            p1 = ctx.commit()
            rev += 1
