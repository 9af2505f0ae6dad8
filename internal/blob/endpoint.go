package blob

import (
	"fmt"
	"net/url"
	"strings"
)

// jsonAPIPath is where the GCS JSON API lives on an endpoint; the storage client sends every
// request under it (uploads under /upload + it).
const jsonAPIPath = "/storage/v1/"

// NormalizeEndpoint returns the GCS JSON API endpoint the storage client needs for raw, or an
// error that says what is wrong with it. It accepts what STORAGE_EMULATOR_HOST accepts and reads
// it the same way: host:port means http://host:port/storage/v1/, and a URL with no path gets
// /storage/v1/. A URL whose path is something else is refused rather than guessed at (the client
// would send reads and uploads to paths the server does not serve, and fills would fail only at
// verification), and so are credentials, a query or a fragment. Empty stays empty: Google Cloud
// Storage.
func NormalizeEndpoint(raw string) (string, error) {
	if raw == "" {
		return "", nil
	}
	if !strings.Contains(raw, "://") {
		raw = "http://" + raw // STORAGE_EMULATOR_HOST's host:port form
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "", fmt.Errorf("%q is not a URL or host:port: %w", raw, err)
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return "", fmt.Errorf("%q: scheme %q is not http or https", raw, u.Scheme)
	case u.Host == "":
		return "", fmt.Errorf("%q has no host", raw)
	case u.User != nil:
		return "", fmt.Errorf("credentials in the endpoint URL (%s@%s) are not used by the storage client and end up in logs; remove them",
			u.User.Username(), u.Host)
	case u.RawQuery != "" || u.ForceQuery:
		return "", fmt.Errorf("%q has a query, which the storage client would drop", raw)
	case u.Fragment != "" || strings.Contains(raw, "#"):
		return "", fmt.Errorf("%q has a fragment", raw)
	}
	switch p := u.Path; {
	case p == "" || p == "/":
		u.Path = jsonAPIPath
	case strings.HasSuffix(p, jsonAPIPath):
	case strings.HasSuffix(p+"/", jsonAPIPath):
		u.Path = p + "/"
	default:
		return "", fmt.Errorf("%q: path %q does not end in %s, where the GCS JSON API is (give the server's base URL or host:port, e.g. http://127.0.0.1:4443, and Detour adds %s)",
			raw, p, jsonAPIPath, jsonAPIPath)
	}
	return u.String(), nil
}
