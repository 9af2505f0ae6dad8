// Package blob stores responses in Google Cloud Storage through the real storage client and builds
// the URLs clients fetch them from. It hashes what it uploads as the bytes pass and reports what
// was committed; it decides nothing about placement.
package blob

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"cloud.google.com/go/storage"
	"google.golang.org/api/googleapi"
	"google.golang.org/api/option"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// Options configure the storage client.
type Options struct {
	// Endpoint of a GCS-compatible emulator (e.g. http://127.0.0.1:4443/storage/v1/, or
	// 127.0.0.1:4443 or http://127.0.0.1:4443: see NormalizeEndpoint). Empty: the
	// STORAGE_EMULATOR_HOST environment variable if set, else Google Cloud Storage with the
	// standard Google credentials.
	Endpoint string
}

// Store uploads objects.
type Store struct {
	client *storage.Client
	lister lister
}

// NewStore builds a storage client.
func NewStore(ctx context.Context, o Options) (*Store, error) {
	var opts []option.ClientOption
	ep, err := NormalizeEndpoint(o.Endpoint)
	if err != nil {
		return nil, fmt.Errorf("GCS endpoint: %w", err)
	}
	if ep != "" {
		opts = append(opts, option.WithEndpoint(ep), option.WithoutAuthentication())
	}
	c, err := storage.NewClient(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("storage client: %w", err)
	}
	return &Store{client: c, lister: lister{endpoint: ep}}, nil
}

// Close releases the client.
func (s *Store) Close() error { return s.client.Close() }

// CanaryMediaType is the media type of the prober's canary objects.
const CanaryMediaType = "text/plain"

// Metadata keys the agent writes on each stored object: the control plane reads them back before
// it marks a fill READY.
const (
	MetaSHA256 = "detour-sha256"
	MetaSHA1   = "detour-sha1"
	MetaKey    = "detour-key"
	// MetaUpload is a random token of the upload that wrote the object, so that an aborted
	// upload recognises its own bytes if the store committed them after all.
	MetaUpload = "detour-upload"
)

// Result describes bytes that passed through an upload or a read.
type Result struct {
	Size       uint64
	SHA256     []byte
	SHA1       []byte
	CRC32C     uint32
	MD5        []byte
	Generation int64 // the committed object's generation (uploads only)
}

// hashes computes every digest Detour keeps, as bytes pass.
type hashes struct {
	s256, s1, md hash.Hash
	crc          hash.Hash32
	n            uint64
}

func newHashes() *hashes {
	return &hashes{s256: sha256.New(), s1: sha1.New(), md: md5.New(), crc: crc32.New(castagnoli)}
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func (h *hashes) Write(p []byte) (int, error) {
	h.s256.Write(p)
	h.s1.Write(p)
	h.md.Write(p)
	h.crc.Write(p)
	h.n += uint64(len(p))
	return len(p), nil
}

func (h *hashes) result() Result {
	return Result{Size: h.n, SHA256: h.s256.Sum(nil), SHA1: h.s1.Sum(nil), MD5: h.md.Sum(nil), CRC32C: h.crc.Sum32()}
}

// Upload streams one object into a bucket, hashing as bytes pass. Commit makes it visible and
// checks that the store holds what was sent; Abort (or a failed Commit) leaves nothing behind.
type Upload struct {
	store  *Store
	w      *storage.Writer
	ctx    context.Context
	cancel context.CancelFunc
	h      *hashes
	err    error
	token  string // MetaUpload
	bucket string
	name   string
}

// Create starts an upload of bucket/name. The object is only created if absent, so a racing or
// retried fill never replaces bytes a redirect may already point at. key is recorded as metadata.
func (s *Store) Create(ctx context.Context, bucket, name, mediaType, key string) *Upload {
	ctx, cancel := context.WithCancel(ctx)
	// A few quick retries for a transient fault; a store that stays down must fail the fill
	// rather than hold it (and its buffers) until the claim runs out.
	obj := s.client.Bucket(bucket).Object(name).If(storage.Conditions{DoesNotExist: true}).
		Retryer(storage.WithMaxAttempts(3), storage.WithMaxRetryDuration(10*time.Second))
	w := obj.NewWriter(ctx)
	w.ContentType = mediaType
	token := uploadToken()
	w.Metadata = map[string]string{MetaKey: key, MetaUpload: token}
	// No chunk buffer: the object streams out in one request as bytes arrive, instead of each
	// fill holding a multi-MiB buffer. A failed upload is not resumed; the fill is aborted.
	w.ChunkSize = 0
	return &Upload{store: s, w: w, ctx: ctx, cancel: cancel, h: newHashes(), token: token, bucket: bucket, name: name}
}

func uploadToken() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Write adds bytes to the object.
func (u *Upload) Write(p []byte) (int, error) {
	if u.err != nil {
		return 0, u.err
	}
	u.h.Write(p)
	n, err := u.w.Write(p)
	if err != nil {
		u.err = err
	}
	return n, err
}

// ErrMismatch means the store holds other bytes than were sent or reported.
var ErrMismatch = errors.New("stored object does not match")

// Commit finishes the upload, checks the store's size, CRC32C and MD5 of the committed object
// against what was sent (deleting the object on a mismatch), and records the SHA-256 and SHA-1 as
// the object's metadata, where the control plane reads them back. The same update puts a temporary
// hold on the object (see Hold): from then on nobody replaces or deletes it without releasing the
// hold first, and Detour releases it only when it deletes the object itself.
func (u *Upload) Commit() (Result, error) {
	defer u.cancel()
	if u.err != nil {
		u.Abort()
		return Result{}, u.err
	}
	res := u.h.result()
	if err := u.w.Close(); err != nil {
		var gerr *googleapi.Error
		if errors.As(err, &gerr) && gerr.Code == http.StatusPreconditionFailed {
			return res, fmt.Errorf("commit upload %s: %w", u.w.Name, ErrExists)
		}
		return Result{}, fmt.Errorf("commit upload %s: %w", u.w.Name, err)
	}
	attrs := u.w.Attrs()
	if attrs == nil {
		return Result{}, fmt.Errorf("commit upload %s: the store returned no attributes", u.w.Name)
	}
	res.Generation = attrs.Generation
	if err := matchStored(attrs, res); err != nil {
		// Not the bytes that were sent: remove exactly this generation and fail the fill.
		_ = u.store.Delete(context.WithoutCancel(u.ctx), attrs.Bucket, attrs.Name, attrs.Generation)
		return Result{}, fmt.Errorf("commit upload %s: %w", u.w.Name, err)
	}
	updated, err := u.store.client.Bucket(attrs.Bucket).Object(attrs.Name).
		If(storage.Conditions{GenerationMatch: attrs.Generation, MetagenerationMatch: attrs.Metageneration}).
		Update(context.WithoutCancel(u.ctx), storage.ObjectAttrsToUpdate{TemporaryHold: true, Metadata: map[string]string{
			MetaKey: attrs.Metadata[MetaKey], MetaSHA256: hex.EncodeToString(res.SHA256), MetaSHA1: hex.EncodeToString(res.SHA1)}})
	if err != nil {
		_ = u.store.Delete(context.WithoutCancel(u.ctx), attrs.Bucket, attrs.Name, attrs.Generation)
		return Result{}, fmt.Errorf("commit upload %s: record hashes: %w", u.w.Name, err)
	}
	// GCS keeps the generation through a metadata update; an emulator that stores one generation
	// per object may not, and the reported generation must be the one that is there.
	res.Generation = updated.Generation
	return res, nil
}

// matchStored compares what a store reports of an object with bytes that were hashed.
func matchStored(attrs *storage.ObjectAttrs, want Result) error {
	switch {
	case uint64(attrs.Size) != want.Size:
		return fmt.Errorf("%w: size %d, expected %d", ErrMismatch, attrs.Size, want.Size)
	case attrs.CRC32C != want.CRC32C:
		return fmt.Errorf("%w: crc32c %08x, expected %08x", ErrMismatch, attrs.CRC32C, want.CRC32C)
	case len(attrs.MD5) > 0 && len(want.MD5) > 0 && !bytes.Equal(attrs.MD5, want.MD5):
		return fmt.Errorf("%w: md5 %x, expected %x", ErrMismatch, attrs.MD5, want.MD5)
	}
	return nil
}

// errAborted fails an upload's request body, so that the store never commits a partial object.
var errAborted = errors.New("upload aborted")

// Abort cancels the upload. It fails the request body rather than closing it: a Close after
// cancelling the context races the cancellation, and could still send a complete (truncated)
// object. (The storage client deprecates CloseWithError in favour of cancellation; the two are
// needed together here.)
//
// Abort returns once the upload's request has ended. If the store committed the object anyway,
// Abort deletes that generation: an aborted fill leaves no bytes behind. The store may commit
// without the client seeing it: its answer was lost, or (the storage client closes the multipart
// body's last boundary before failing it, so a server reading the parts as they stream can take a
// truncated body for a whole one) the store commits truncated bytes after Abort has returned. So
// when the client saw no commit, Abort looks for an object under the name that carries this
// upload's token, at once and again a second later. Deleting it is always safe: without the
// hashes Commit records, no report can ever be verified against it. (What commits later still is
// an orphan the control plane's reconciler collects.)
func (u *Upload) Abort() {
	u.cancel()
	_ = u.w.CloseWithError(errAborted) //nolint:staticcheck // see above
	// The pipe already holds errAborted, so Close cannot end the body cleanly; it waits for the
	// upload goroutine.
	_ = u.w.Close()
	if a := u.w.Attrs(); a != nil {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(u.ctx), 10*time.Second)
		defer cancel()
		_ = u.store.Delete(ctx, a.Bucket, a.Name, a.Generation)
		return
	}
	// In the background: Abort must not wait on a store that may be down (a fill's failure is
	// what opens the agent's breaker).
	go func() {
		if !u.deleteOwn() {
			time.AfterFunc(abortRecheck, func() { u.deleteOwn() })
		}
	}()
}

// abortRecheck is when an aborted upload looks again for bytes the store committed late.
const abortRecheck = time.Second

// deleteOwn deletes the object under the upload's name if this upload wrote it and no Commit
// recorded its hashes, and says whether it found one. One try each, no retries: the store may be
// why the upload failed.
func (u *Upload) deleteOwn() bool {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(u.ctx), 5*time.Second)
	defer cancel()
	obj := u.store.client.Bucket(u.bucket).Object(u.name).Retryer(storage.WithPolicy(storage.RetryNever))
	a, err := obj.Attrs(ctx)
	if err != nil || a.Metadata[MetaUpload] != u.token || a.Metadata[MetaSHA256] != "" {
		return false
	}
	_ = obj.Generation(a.Generation).Delete(ctx)
	return true
}

// ErrNotFound means the object does not exist.
var ErrNotFound = errors.New("object not found")

// ErrExists means an upload found the object already there (an earlier fill committed it); the
// Result returned with it describes the bytes this upload carried.
var ErrExists = errors.New("object already exists")

// Hash reads an existing object and returns its size, hashes and generation.
func (s *Store) Hash(ctx context.Context, bucket, name string) (Result, error) {
	return s.hashGeneration(ctx, bucket, name, 0)
}

func (s *Store) hashGeneration(ctx context.Context, bucket, name string, generation int64) (Result, error) {
	obj := s.client.Bucket(bucket).Object(name)
	if generation != 0 {
		obj = obj.Generation(generation)
	}
	rd, err := obj.NewReader(ctx)
	if errors.Is(err, storage.ErrObjectNotExist) {
		return Result{}, fmt.Errorf("%s/%s: %w", bucket, name, ErrNotFound)
	}
	if err != nil {
		return Result{}, err
	}
	defer rd.Close()
	h := newHashes()
	if _, err := io.Copy(h, rd); err != nil {
		return Result{}, fmt.Errorf("read %s/%s: %w", bucket, name, err)
	}
	res := h.result()
	res.Generation = rd.Attrs.Generation
	return res, nil
}

// Attrs is what the store says of an object.
type Attrs struct {
	Size        uint64
	CRC32C      uint32
	MD5         []byte
	Generation  int64
	ContentType string
	Created     time.Time
	Metadata    map[string]string
	// TemporaryHold and EventBasedHold are the object's holds (see Hold).
	TemporaryHold, EventBasedHold bool
}

// Stat reads an object's attributes.
func (s *Store) Stat(ctx context.Context, bucket, name string) (Attrs, error) {
	a, err := s.client.Bucket(bucket).Object(name).Attrs(ctx)
	if errors.Is(err, storage.ErrObjectNotExist) {
		return Attrs{}, fmt.Errorf("%s/%s: %w", bucket, name, ErrNotFound)
	}
	if err != nil {
		return Attrs{}, fmt.Errorf("%s/%s: %w", bucket, name, err)
	}
	return attrsOf(a), nil
}

func attrsOf(a *storage.ObjectAttrs) Attrs {
	return Attrs{Size: uint64(a.Size), CRC32C: a.CRC32C, MD5: a.MD5, Generation: a.Generation,
		ContentType: a.ContentType, Created: a.Created, Metadata: a.Metadata,
		TemporaryHold: a.TemporaryHold, EventBasedHold: a.EventBasedHold}
}

// Claim is what a fill report says of an object, to verify against the store.
type Claim struct {
	Bucket, Name, MediaType, Key string
	Size                         uint64
	SHA256, SHA1                 []byte
	CRC32C                       uint32
	Generation                   int64
}

// Verify checks that the store holds the object a fill reported: the generation, size, CRC32C and
// media type the store reports, and the SHA-256, SHA-1 and key recorded as its metadata. With full
// set it also reads the bytes back and hashes them. The error names what differs.
func (s *Store) Verify(ctx context.Context, c Claim, full bool) error {
	a, err := s.Stat(ctx, c.Bucket, c.Name)
	if err != nil {
		return err
	}
	switch {
	case a.Generation != c.Generation:
		return fmt.Errorf("%w: generation %d, the report says %d", ErrMismatch, a.Generation, c.Generation)
	case a.Size != c.Size:
		return fmt.Errorf("%w: size %d, the report says %d", ErrMismatch, a.Size, c.Size)
	case a.CRC32C != c.CRC32C:
		return fmt.Errorf("%w: crc32c %08x, the report says %08x", ErrMismatch, a.CRC32C, c.CRC32C)
	case a.ContentType != c.MediaType:
		return fmt.Errorf("%w: content type %q, granted %q", ErrMismatch, a.ContentType, c.MediaType)
	case a.Metadata[MetaKey] != c.Key:
		return fmt.Errorf("%w: stored for key %.16q, the report is for %.16s", ErrMismatch, a.Metadata[MetaKey], c.Key)
	case a.Metadata[MetaSHA256] != hex.EncodeToString(c.SHA256):
		return fmt.Errorf("%w: recorded sha256 %.16q differs from the report", ErrMismatch, a.Metadata[MetaSHA256])
	case a.Metadata[MetaSHA1] != hex.EncodeToString(c.SHA1):
		return fmt.Errorf("%w: recorded sha1 %.16q differs from the report", ErrMismatch, a.Metadata[MetaSHA1])
	}
	if !full {
		return nil
	}
	got, err := s.hashGeneration(ctx, c.Bucket, c.Name, c.Generation)
	if err != nil {
		return err
	}
	switch {
	case got.Size != c.Size:
		return fmt.Errorf("%w: read %d bytes, the report says %d", ErrMismatch, got.Size, c.Size)
	case !bytes.Equal(got.SHA256, c.SHA256):
		return fmt.Errorf("%w: sha256 of the stored bytes differs from the report", ErrMismatch)
	case !bytes.Equal(got.SHA1, c.SHA1):
		return fmt.Errorf("%w: sha1 of the stored bytes differs from the report", ErrMismatch)
	}
	return nil
}

// Copy makes dstBucket/dstName a server-side copy of generation srcGeneration of
// srcBucket/srcName: the store moves the bytes (a rewrite, repeated until done), none pass through
// Detour. The copy keeps the source's content type and metadata (key and recorded hashes), and is
// made only if dstName does not exist (ErrExists otherwise), and held like a committed upload. A
// source that is gone, or no longer at that generation, is ErrNotFound. It returns the new object's
// attributes; the caller verifies them like a fill's.
func (s *Store) Copy(ctx context.Context, srcBucket, srcName string, srcGeneration int64, dstBucket, dstName string) (Attrs, error) {
	src := s.client.Bucket(srcBucket).Object(srcName).Generation(srcGeneration)
	dst := s.client.Bucket(dstBucket).Object(dstName).If(storage.Conditions{DoesNotExist: true})
	a, err := dst.CopierFrom(src).Run(ctx)
	var gerr *googleapi.Error
	switch {
	case errors.Is(err, storage.ErrObjectNotExist), errors.As(err, &gerr) && gerr.Code == http.StatusNotFound:
		return Attrs{}, fmt.Errorf("copy %s/%s#%d: %w", srcBucket, srcName, srcGeneration, ErrNotFound)
	case errors.As(err, &gerr) && gerr.Code == http.StatusPreconditionFailed:
		return Attrs{}, fmt.Errorf("copy to %s/%s: %w", dstBucket, dstName, ErrExists)
	case err != nil:
		return Attrs{}, fmt.Errorf("copy %s/%s#%d to %s/%s: %w", srcBucket, srcName, srcGeneration, dstBucket, dstName, err)
	}
	held, err := s.Hold(ctx, dstBucket, dstName, a.Generation, true)
	if err != nil {
		_ = s.Delete(context.WithoutCancel(ctx), dstBucket, dstName, a.Generation)
		return Attrs{}, fmt.Errorf("copy to %s/%s: %w", dstBucket, dstName, err)
	}
	return held, nil
}

// Hold puts a temporary hold on one generation of an object (on), or releases the holds on it:
// GCS refuses to delete or replace a held object (https://cloud.google.com/storage/docs/object-holds),
// so that the bytes a READY record names cannot change under it by accident (a lifecycle rule, a
// mistaken copy, another tool). Detour holds every object it stores and releases the hold only to
// delete the object (Delete). It returns the object's attributes after the change: an emulator that
// keeps one generation per object may give it a new one. A generation that is gone is ErrNotFound.
func (s *Store) Hold(ctx context.Context, bucket, name string, generation int64, on bool) (Attrs, error) {
	obj := s.client.Bucket(bucket).Object(name).If(storage.Conditions{GenerationMatch: generation})
	update := storage.ObjectAttrsToUpdate{TemporaryHold: on}
	if !on {
		update.EventBasedHold = false
	}
	a, err := obj.Update(ctx, update)
	var gerr *googleapi.Error
	switch {
	case errors.Is(err, storage.ErrObjectNotExist), errors.As(err, &gerr) && (gerr.Code == http.StatusNotFound || gerr.Code == http.StatusPreconditionFailed):
		return Attrs{}, fmt.Errorf("hold %s/%s#%d: %w", bucket, name, generation, ErrNotFound)
	case err != nil:
		return Attrs{}, fmt.Errorf("hold %s/%s#%d: %w", bucket, name, generation, err)
	}
	return attrsOf(a), nil
}

// Delete removes one generation of an object (any generation when 0), releasing its holds first
// when the store refuses to delete it for them. A missing object is not an error: deletion is
// idempotent.
func (s *Store) Delete(ctx context.Context, bucket, name string, generation int64) error {
	err := s.deleteOnce(ctx, bucket, name, generation)
	var gerr *googleapi.Error
	if !errors.As(err, &gerr) || gerr.Code != http.StatusForbidden {
		return err
	}
	// Held (or not ours to delete, which the release then says).
	if generation == 0 {
		a, serr := s.Stat(ctx, bucket, name)
		if errors.Is(serr, ErrNotFound) {
			return nil
		}
		if serr != nil {
			return serr
		}
		generation = a.Generation
	}
	a, herr := s.Hold(ctx, bucket, name, generation, false)
	if errors.Is(herr, ErrNotFound) {
		return nil
	}
	if herr != nil {
		return fmt.Errorf("delete %s/%s: release its hold: %w", bucket, name, herr)
	}
	return s.deleteOnce(ctx, bucket, name, a.Generation)
}

func (s *Store) deleteOnce(ctx context.Context, bucket, name string, generation int64) error {
	obj := s.client.Bucket(bucket).Object(name)
	if generation != 0 {
		// Only that generation: if another one is there now, it is not ours to delete (the store
		// answers 404 for the generation we named).
		obj = obj.Generation(generation)
	}
	err := obj.Delete(ctx)
	if err == nil || errors.Is(err, storage.ErrObjectNotExist) {
		return nil
	}
	return fmt.Errorf("delete %s/%s: %w", bucket, name, err)
}

// Listed is one object of a listing.
type Listed struct {
	Name       string
	Size       uint64
	Generation int64
	CRC32C     uint32
	Created    time.Time
}

// Put writes a small object whole, replacing what is there (the prober's canary).
func (s *Store) Put(ctx context.Context, bucket, name, mediaType string, data []byte) error {
	w := s.client.Bucket(bucket).Object(name).NewWriter(ctx)
	w.ContentType = mediaType
	if _, err := w.Write(data); err != nil {
		w.Close()
		return fmt.Errorf("put %s/%s: %w", bucket, name, err)
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("put %s/%s: %w", bucket, name, err)
	}
	return nil
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

// LocationURL is the URL a client GETs for bucket/objectName through target t's URL form, whatever
// generation is current (LocationURLAt with generation 0).
func LocationURL(t *pb.Target, bucket, objectName string, signer *Signer, now time.Time, defaultTTL time.Duration) (string, error) {
	return LocationURLAt(t, bucket, objectName, 0, signer, now, defaultTTL)
}

// LocationURLAt is the URL a client GETs for generation generation of bucket/objectName through
// target t's URL form. Public and CDN base URLs serve t's current bucket: callers pass only objects
// stored there.
//
// Where the form allows it, the URL names the generation (generation > 0), so that it serves the
// bytes that were verified or nothing: GCS's XML API, which public URLs
// (https://storage.googleapis.com/bucket/object) and V4-signed URLs reach, serves
// ?generation=N as that generation and answers 404 once it is no longer there (replaced or deleted;
// a versioned bucket keeps it readable as a noncurrent version). The parameter is part of what a
// signed URL signs. A CDN base URL is not pinned: a CDN caches by URL and may not pass the query
// to GCS, so its URL names the object, and between a replacement and Detour's noticing it (the
// bucket's change notification) a CDN that fetches from the bucket may serve the new bytes; after
// that, no redirect names the object.
func LocationURLAt(t *pb.Target, bucket, objectName string, generation int64, signer *Signer, now time.Time, defaultTTL time.Duration) (string, error) {
	switch f := t.GetUrlForm().GetForm().(type) {
	case *pb.UrlForm_PublicBaseUrl:
		u, err := joinURL(f.PublicBaseUrl, objectName)
		if err != nil || generation <= 0 {
			return u, err
		}
		sep := "?"
		if strings.Contains(u, "?") {
			sep = "&"
		}
		return u + sep + "generation=" + strconv.FormatInt(generation, 10), nil
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
		if generation > 0 {
			opts.QueryParameters = url.Values{"generation": {strconv.FormatInt(generation, 10)}}
		}
		return storage.SignedURL(bucket, objectName, opts)
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
