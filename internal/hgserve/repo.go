package hgserve

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
)

// Repo is a repository the caller builds with hg.
type Repo struct {
	HG  string
	Dir string
}

// Init creates an empty repository in dir. Its phases are non-publishing, so that a clone sees
// draft changesets as draft (a publishing server turns everything public for its clients).
func Init(ctx context.Context, hg, dir string) (*Repo, error) {
	if _, err := Run(ctx, hg, filepath.Dir(dir), "init", dir); err != nil {
		return nil, err
	}
	hgrc := "[phases]\npublish = false\n"
	if err := os.WriteFile(filepath.Join(dir, ".hg", "hgrc"), []byte(hgrc), 0o644); err != nil {
		return nil, err
	}
	return &Repo{HG: hg, Dir: dir}, nil
}

// Hg runs an hg command in the repository.
func (r *Repo) Hg(ctx context.Context, args ...string) ([]byte, error) {
	return Run(ctx, r.HG, r.Dir, args...)
}

// WriteFile writes a file in the working directory.
func (r *Repo) WriteFile(name string, data []byte) error {
	p := filepath.Join(r.Dir, name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	return os.WriteFile(p, data, 0o644)
}

// Commit adds and removes what changed and commits it.
func (r *Repo) Commit(ctx context.Context, msg string) error {
	_, err := r.Hg(ctx, "commit", "--addremove", "--quiet", "--message", msg)
	return err
}

// Populate writes files text files spread over directories (a few hundred bytes to a few KiB
// each) and bigFiles files of bigSize random bytes, deterministically from seed.
func (r *Repo) Populate(seed uint64, files, bigFiles, bigSize int) error {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	for i := 0; i < files; i++ {
		var b []byte
		for n := 1 + rng.IntN(80); n > 0; n-- {
			b = fmt.Appendf(b, "file %d line %d: %x\n", i, n, rng.Uint64())
		}
		if err := r.WriteFile(fmt.Sprintf("src/dir%02d/file%03d.txt", i%17, i), b); err != nil {
			return err
		}
	}
	for i := 0; i < bigFiles; i++ {
		b := make([]byte, bigSize)
		for j := 0; j+8 <= len(b); j += 8 {
			v := rng.Uint64()
			for k := 0; k < 8; k++ {
				b[j+k] = byte(v >> (8 * k))
			}
		}
		if err := r.WriteFile(fmt.Sprintf("assets/blob%02d.bin", i), b); err != nil {
			return err
		}
	}
	return nil
}
