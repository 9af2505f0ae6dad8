package deploy

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// unit is a systemd unit file: section → key → values, in order (a key may repeat).
type unit map[string]map[string][]string

// parseUnit reads a unit file, joining continued lines as systemd does.
func parseUnit(t *testing.T, path string) unit {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	u := unit{}
	section := ""
	var pending string
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if pending == "" && (line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";")) {
			continue
		}
		if cont, ok := strings.CutSuffix(line, "\\"); ok {
			pending += cont + " "
			continue
		}
		line, pending = pending+line, ""
		if strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]") {
			section = strings.Trim(line, "[]")
			u[section] = map[string][]string{}
			continue
		}
		key, value, ok := strings.Cut(line, "=")
		if !ok || section == "" {
			t.Fatalf("%s:%d: not a key=value line in a section: %q", path, n, line)
		}
		u[section][key] = append(u[section][key], value)
	}
	return u
}

// last returns the value in force for a key: the last one given.
func (u unit) last(section, key string) (string, bool) {
	vs := u[section][key]
	if len(vs) == 0 {
		return "", false
	}
	return vs[len(vs)-1], true
}

// hardening are the [Service] settings every unit must have, with their values ("" = empty).
var hardening = map[string]string{
	"DynamicUser":           "yes",
	"ProtectSystem":         "strict",
	"ProtectHome":           "yes",
	"PrivateTmp":            "yes",
	"NoNewPrivileges":       "yes",
	"CapabilityBoundingSet": "",
	"Restart":               "on-failure",
}

// envRef matches ${VAR} in ExecStart (a whole word, as each flag value must be).
var envRef = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)\}`)

func TestSystemdUnitsAreHardenedAndMatchTheBinaries(t *testing.T) {
	units, err := filepath.Glob("systemd/*.service")
	if err != nil || len(units) != 2 {
		t.Fatalf("want the control plane's and the agent's units in systemd/, found %q (%v)", units, err)
	}
	for _, path := range units {
		t.Run(filepath.Base(path), func(t *testing.T) {
			u := parseUnit(t, path)
			svc := u["Service"]
			for key, want := range hardening {
				if got, ok := u.last("Service", key); !ok || got != want {
					t.Errorf("%s=%q, want %q", key, got, want)
				}
			}
			for _, key := range []string{"RestrictAddressFamilies", "MemoryMax", "EnvironmentFile", "TimeoutStopSec"} {
				if v, _ := u.last("Service", key); v == "" {
					t.Errorf("%s is not set", key)
				}
			}
			execStart, _ := u.last("Service", "ExecStart")
			fields := strings.Fields(execStart)
			if len(fields) == 0 {
				t.Fatal("no ExecStart")
			}
			binary := detourBinary(fields[0])
			if binary == "" {
				t.Fatalf("ExecStart runs %s, not a detour-<command> binary", fields[0])
			}
			flags := checkFlags(t, path, binary, fields[1:], binaryFlags(t, binary))

			// systemd waits TimeoutStopSec after SIGTERM, then kills: the process needs its
			// whole --shutdown-timeout inside that.
			stop, _ := u.last("Service", "TimeoutStopSec")
			stopAfter, err := time.ParseDuration(stop)
			if err != nil {
				t.Fatalf("TimeoutStopSec=%s: write it with a unit (15s): %v", stop, err)
			}
			drain, err := time.ParseDuration(flags["shutdown-timeout"])
			if err != nil {
				t.Fatalf("ExecStart: --shutdown-timeout %q: %v", flags["shutdown-timeout"], err)
			}
			if stopAfter <= drain {
				t.Errorf("TimeoutStopSec=%s leaves no margin over --shutdown-timeout=%s", stopAfter, drain)
			}

			// Every ${VAR} comes from the EnvironmentFile, whose example must set it.
			envFile, _ := u.last("Service", "EnvironmentFile")
			example := filepath.Join("systemd", strings.TrimSuffix(filepath.Base(envFile), ".env")+".env.example")
			vars := envExample(t, example)
			for _, m := range envRef.FindAllStringSubmatch(execStart, -1) {
				if _, ok := vars[m[1]]; !ok {
					t.Errorf("ExecStart uses ${%s}, which %s does not set", m[1], example)
				}
			}

			if binary == "controlplane" {
				state, _ := u.last("Service", "StateDirectory")
				if state == "" || flags["data-dir"] != "%S/"+state {
					t.Errorf("the embedded etcd's --data-dir %q is not the StateDirectory %q", flags["data-dir"], state)
				}
			}
			for _, cred := range svc["LoadCredential"] {
				name, _, _ := strings.Cut(cred, ":")
				if !strings.Contains(execStart, "%d/"+name) {
					t.Errorf("LoadCredential %s is not used by ExecStart", name)
				}
			}
			analyze(t, path)
		})
	}
}

// envExample returns the variables an example environment file sets.
func envExample(t *testing.T, path string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("the EnvironmentFile's example: %v", err)
	}
	vars := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if line = strings.TrimSpace(line); line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Errorf("%s: %q is not VAR=value", path, line)
		}
		vars[k] = v
	}
	return vars
}

// analyze runs systemd's own checks where systemd-analyze is installed: verify (unknown keys,
// bad values) and the security exposure score. The binary is swapped for a stub, since verify
// wants ExecStart to exist.
func analyze(t *testing.T, path string) {
	t.Helper()
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Log("systemd-analyze not installed: unit files checked by this test alone")
		return
	}
	dir := t.TempDir()
	stub := filepath.Join(dir, "stub")
	if err := os.WriteFile(stub, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b = regexp.MustCompile(`/usr/local/bin/detour-[a-z]+`).ReplaceAll(b, []byte(stub))
	copyPath := filepath.Join(dir, filepath.Base(path))
	if err := os.WriteFile(copyPath, b, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(sa, "verify", copyPath).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("systemd-analyze verify (exit: %v) reported:\n%s", err, out)
	}
	// 20 is "2.0 OK" on systemd's 0–10 exposure scale.
	out, err = exec.Command(sa, "security", "--offline=yes", "--threshold=20", copyPath).CombinedOutput()
	if err != nil {
		t.Errorf("systemd-analyze security: exposure above 2.0 (%v)\n%s", err, out)
	}
}
