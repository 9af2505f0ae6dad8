# Grows a Mercurial repository by N changesets in one process, deterministically from a seed.
# Run with a Mercurial that has its C extensions (Debian's 6.3.2 at /usr/bin/hg: python3 build.py)
# on a repository created by the Mercurial that serves it (5.6.1), so its format stays one 5.6.1
# reads. Each changeset edits three files (a line replaced, a line added) and every fifth adds a
# file; the first call also writes FILES initial files of about 2 KiB.
#   python3 build.py REPO COUNT SEED FILES
import random
import sys

from mercurial import context, hg, node as nodemod, ui as uimod

path, count, seed, nfiles = sys.argv[1].encode(), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
u = uimod.ui.load()
u.setconfig(b'ui', b'quiet', b'true')
repo = hg.repository(u, path)
rng = random.Random(seed)


def line(rng, i):
    return b'%d: %016x %08x %s\n' % (i, rng.getrandbits(64), rng.getrandbits(32), b'x' * rng.randrange(40))


with repo.wlock(), repo.lock():
    tip = repo[b'tip']
    files = {}
    for f in tip.manifest():
        files[f] = tip[f].data()
    rev = len(repo)
    if not files:
        for i in range(nfiles):
            files[b'src/dir%02d/file%04d.txt' % (i % 23, i)] = b''.join(line(rng, j) for j in range(25))
    with repo.transaction(b'build'):
        p1 = tip.node()
        for n in range(count):
            changed = {}
            if rev == 0:
                changed = dict(files)
            else:
                for f in rng.sample(sorted(files), 3):
                    lines = files[f].splitlines(True)
                    lines[rng.randrange(len(lines))] = line(rng, rev)
                    lines.insert(rng.randrange(len(lines) + 1), line(rng, rev + 1))
                    changed[f] = b''.join(lines)
                if rev % 5 == 0:
                    f = b'src/new/file%05d.txt' % rev
                    changed[f] = b''.join(line(rng, j) for j in range(10))
            files.update(changed)

            def filectx(repo, memctx, f):
                return context.memfilectx(repo, memctx, f, changed[f])

            ctx = context.memctx(repo, (p1, nodemod.nullid), b'changeset %d' % rev, sorted(changed), filectx,
                                 user=b'detour <detour@localhost>', date=(1600000000 + rev, 0))
            p1 = ctx.commit()
            rev += 1
print(len(repo))
