// Package blob stores responses in Google Cloud Storage through the real storage client and builds
// the URLs clients fetch them from. It hashes what it uploads as the bytes pass and reports what
// was committed; it decides nothing about placement.
package blob

import (
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"cloud.google.com/go/storage"
	"google.golang.org/api/googleapi"
	"google.golang.org/api/option"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// Options configure the storage client.
type Options struct {
	// Endpoint of a GCS-compatible emulator (e.g. http://127.0.0.1:4443/storage/v1/). Empty: the
	// STORAGE_EMULATOR_HOST environment variable if set, else Google Cloud Storage with the
	// standard Google credentials.
	Endpoint string
}

// Store uploads objects.
type Store struct {
	client *storage.Client
}

// NewStore builds a storage client.
func NewStore(ctx context.Context, o Options) (*Store, error) {
	var opts []option.ClientOption
	if o.Endpoint != "" {
		opts = append(opts, option.WithEndpoint(o.Endpoint), option.WithoutAuthentication())
	}
	c, err := storage.NewClient(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("storage client: %w", err)
	}
	return &Store{client: c}, nil
}

// Close releases the client.
func (s *Store) Close() error { return s.client.Close() }

// Result describes a committed upload.
type Result struct {
	Size   uint64
	SHA256 []byte
	SHA1   []byte
}

// Upload streams one object into a bucket, hashing as bytes pass. Commit makes it visible; Abort
// (or a failed Commit) leaves nothing behind.
type Upload struct {
	w      *storage.Writer
	cancel context.CancelFunc
	s256   hash.Hash
	s1     hash.Hash
	n      uint64
	err    error
}

// Create starts an upload of bucket/name. The object is only created if absent, so a racing or
// retried fill never replaces bytes a redirect may already point at.
func (s *Store) Create(ctx context.Context, bucket, name, mediaType string) *Upload {
	ctx, cancel := context.WithCancel(ctx)
	// A few quick retries for a transient fault; a store that stays down must fail the fill
	// rather than hold it (and its buffers) until the claim runs out.
	obj := s.client.Bucket(bucket).Object(name).If(storage.Conditions{DoesNotExist: true}).
		Retryer(storage.WithMaxAttempts(3), storage.WithMaxRetryDuration(10*time.Second))
	w := obj.NewWriter(ctx)
	w.ContentType = mediaType
	// No chunk buffer: the object streams out in one request as bytes arrive, instead of each
	// fill holding a multi-MiB buffer. A failed upload is not resumed; the fill is aborted.
	w.ChunkSize = 0
	return &Upload{w: w, cancel: cancel, s256: sha256.New(), s1: sha1.New()}
}

// Write adds bytes to the object.
func (u *Upload) Write(p []byte) (int, error) {
	if u.err != nil {
		return 0, u.err
	}
	u.s256.Write(p)
	u.s1.Write(p)
	u.n += uint64(len(p))
	n, err := u.w.Write(p)
	if err != nil {
		u.err = err
	}
	return n, err
}

// Commit finishes the upload and returns what was stored.
func (u *Upload) Commit() (Result, error) {
	defer u.cancel()
	if u.err != nil {
		u.cancel()
		_ = u.w.Close()
		return Result{}, u.err
	}
	res := Result{Size: u.n, SHA256: u.s256.Sum(nil), SHA1: u.s1.Sum(nil)}
	if err := u.w.Close(); err != nil {
		var gerr *googleapi.Error
		if errors.As(err, &gerr) && gerr.Code == http.StatusPreconditionFailed {
			return res, fmt.Errorf("commit upload %s: %w", u.w.Name, ErrExists)
		}
		return Result{}, fmt.Errorf("commit upload %s: %w", u.w.Name, err)
	}
	if attrs := u.w.Attrs(); attrs != nil && uint64(attrs.Size) != u.n {
		return Result{}, fmt.Errorf("commit upload %s: store reports %d bytes, %d written", u.w.Name, attrs.Size, u.n)
	}
	return res, nil
}

// Abort cancels the upload.
func (u *Upload) Abort() {
	u.cancel()
	_ = u.w.Close()
}

// ErrNotFound means the object does not exist.
var ErrNotFound = errors.New("object not found")

// ErrExists means an upload found the object already there (an earlier fill committed it); the
// Result returned with it describes the bytes this upload carried.
var ErrExists = errors.New("object already exists")

// Hash reads an existing object and returns its size and hashes.
func (s *Store) Hash(ctx context.Context, bucket, name string) (Result, error) {
	rd, err := s.client.Bucket(bucket).Object(name).NewReader(ctx)
	if errors.Is(err, storage.ErrObjectNotExist) {
		return Result{}, fmt.Errorf("%s/%s: %w", bucket, name, ErrNotFound)
	}
	if err != nil {
		return Result{}, err
	}
	defer rd.Close()
	s256, s1 := sha256.New(), sha1.New()
	n, err := io.Copy(io.MultiWriter(s256, s1), rd)
	if err != nil {
		return Result{}, fmt.Errorf("read %s/%s: %w", bucket, name, err)
	}
	return Result{Size: uint64(n), SHA256: s256.Sum(nil), SHA1: s1.Sum(nil)}, nil
}

// Size returns an existing object's size.
func (s *Store) Size(ctx context.Context, bucket, name string) (int64, error) {
	attrs, err := s.client.Bucket(bucket).Object(name).Attrs(ctx)
	if errors.Is(err, storage.ErrObjectNotExist) {
		return 0, fmt.Errorf("%s/%s: %w", bucket, name, ErrNotFound)
	}
	if err != nil {
		return 0, err
	}
	return attrs.Size, nil
}

// ObjectName is where the response with content key key lives under a target's prefix.
func ObjectName(prefix, key string) string { return prefix + key }

// Signer signs V4 URLs.
type Signer struct {
	GoogleAccessID string
	PrivateKey     []byte // PEM
	// Hostname and Insecure point signed URLs at an emulator instead of storage.googleapis.com.
	Hostname string
	Insecure bool
}

// LoadServiceAccount reads a service-account JSON key file into a Signer.
func LoadServiceAccount(path string) (*Signer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var key struct {
		ClientEmail string `json:"client_email"`
		PrivateKey  string `json:"private_key"`
	}
	if err := json.Unmarshal(b, &key); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if key.ClientEmail == "" || key.PrivateKey == "" {
		return nil, fmt.Errorf("%s: client_email and private_key are required", path)
	}
	return &Signer{GoogleAccessID: key.ClientEmail, PrivateKey: []byte(key.PrivateKey)}, nil
}

// ErrNoSigner means a target wants signed URLs and no signing key is configured.
var ErrNoSigner = errors.New("target wants V4-signed URLs and no signing key is configured")

// LocationURL is the URL a client GETs for the object at a target.
func LocationURL(t *pb.Target, objectName string, signer *Signer, now time.Time, defaultTTL time.Duration) (string, error) {
	switch f := t.GetUrlForm().GetForm().(type) {
	case *pb.UrlForm_PublicBaseUrl:
		return joinURL(f.PublicBaseUrl, objectName)
	case *pb.UrlForm_CdnBaseUrl:
		return joinURL(f.CdnBaseUrl, objectName)
	case *pb.UrlForm_Signed:
		if signer == nil {
			return "", ErrNoSigner
		}
		ttl := f.Signed.GetTtl().AsDuration()
		if ttl <= 0 {
			ttl = defaultTTL
		}
		id := f.Signed.GetGoogleAccessId()
		if id == "" {
			id = signer.GoogleAccessID
		}
		opts := &storage.SignedURLOptions{GoogleAccessID: id, PrivateKey: signer.PrivateKey, Method: "GET",
			Expires: now.Add(ttl), Scheme: storage.SigningSchemeV4, Hostname: signer.Hostname,
			Insecure: signer.Insecure, Style: storage.PathStyle()}
		return storage.SignedURL(t.GetStore().GetBucket(), objectName, opts)
	}
	return "", fmt.Errorf("target %q has no url form", t.GetName())
}

func joinURL(base, objectName string) (string, error) {
	u, err := url.Parse(base)
	if err != nil {
		return "", err
	}
	segs := strings.Split(objectName, "/")
	for i, s := range segs {
		segs[i] = url.PathEscape(s)
	}
	return strings.TrimSuffix(u.String(), "/") + "/" + strings.Join(segs, "/"), nil
}
