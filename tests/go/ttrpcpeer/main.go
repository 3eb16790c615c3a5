// ttrpcpeer: the Go reference peer (github.com/containerd/ttrpc) that caa's interop tests, benchmarks and demo
// talk to. Every mode prints JSON on stdout; see tests/go/README.md for the command line.
//
// Built offline in GOPATH mode against Debian's golang-github-containerd-ttrpc-dev (the gogo-based API):
// payloads are raw bytes (rawMessage) so that no generated Go code is needed; the few hypervisor and
// podvminfo fields are encoded by hand below.
package main

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const echoService = "caa.test.Echo"

// rawMessage satisfies gogo's proto.Message plus Marshaler/Unmarshaler: the payload bytes as they are.
type rawMessage struct{ data []byte }

func (m *rawMessage) Reset()                   { m.data = nil }
func (m *rawMessage) String() string           { return hex.EncodeToString(m.data) }
func (m *rawMessage) ProtoMessage()            {}
func (m *rawMessage) Marshal() ([]byte, error) { return m.data, nil }
func (m *rawMessage) Unmarshal(b []byte) error {
	m.data = append([]byte(nil), b...)
	return nil
}

// ---- minimal protobuf wire encoding for the hypervisor / podvminfo messages

func appendVarint(b []byte, v uint64) []byte {
	var tmp [binary.MaxVarintLen64]byte
	n := binary.PutUvarint(tmp[:], v)
	return append(b, tmp[:n]...)
}

func appendBytesField(b []byte, field int, v []byte) []byte {
	b = appendVarint(b, uint64(field<<3|2))
	b = appendVarint(b, uint64(len(v)))
	return append(b, v...)
}

func appendString(b []byte, field int, v string) []byte {
	if v == "" {
		return b
	}
	return appendBytesField(b, field, []byte(v))
}

func appendBool(b []byte, field int, v bool) []byte {
	if !v {
		return b
	}
	b = appendVarint(b, uint64(field<<3))
	return append(b, 1)
}

// stringFields decodes the length-delimited fields of a flat message (enough for the responses used here).
func stringFields(b []byte) (map[int]string, error) {
	out := map[int]string{}
	for len(b) > 0 {
		key, n := binary.Uvarint(b)
		if n <= 0 {
			return nil, errors.New("bad tag")
		}
		b = b[n:]
		field, wire := int(key>>3), key&7
		switch wire {
		case 0:
			_, n = binary.Uvarint(b)
			if n <= 0 {
				return nil, errors.New("bad varint")
			}
			b = b[n:]
		case 2:
			l, n := binary.Uvarint(b)
			if n <= 0 || uint64(len(b)-n) < l {
				return nil, errors.New("bad length")
			}
			out[field] = string(b[n : n+int(l)])
			b = b[n+int(l):]
		case 1:
			b = b[8:]
		case 5:
			b = b[4:]
		default:
			return nil, fmt.Errorf("unsupported wire type %d", wire)
		}
	}
	return out, nil
}

// ---- output

type result map[string]interface{}

func emit(r result) {
	out, _ := json.Marshal(r)
	fmt.Println(string(out))
}

func errResult(err error, elapsed time.Duration) result {
	r := result{"ok": false, "elapsed_ms": ms(elapsed)}
	if st, ok := status.FromError(err); ok {
		r["code"] = int(st.Code())
		r["message"] = st.Message()
	} else if errors.Is(err, context.DeadlineExceeded) {
		r["code"] = int(codes.DeadlineExceeded)
		r["message"] = err.Error()
	} else if errors.Is(err, context.Canceled) {
		r["code"] = int(codes.Canceled)
		r["message"] = err.Error()
	} else {
		r["code"] = int(codes.Unknown)
		r["message"] = err.Error()
	}
	return r
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func fail(format string, args ...interface{}) {
	emit(result{"ok": false, "code": -1, "message": fmt.Sprintf(format, args...)})
	os.Exit(2)
}

// ---- server mode: the echo service

type sleepRequest struct {
	Ms int64 `json:"ms"`
}

type errorRequest struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

var stdoutMu sync.Mutex

func event(r result) {
	stdoutMu.Lock()
	defer stdoutMu.Unlock()
	emit(r)
}

func timeoutMs(ctx context.Context) float64 {
	if dl, ok := ctx.Deadline(); ok {
		return ms(time.Until(dl))
	}
	return -1
}

func echoMethods() map[string]ttrpc.Method {
	return map[string]ttrpc.Method{
		"Echo": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			req := &rawMessage{}
			if err := unmarshal(req); err != nil {
				return nil, err
			}
			return &rawMessage{data: req.data}, nil
		},
		"Error": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			req := &rawMessage{}
			if err := unmarshal(req); err != nil {
				return nil, err
			}
			var e errorRequest
			if err := json.Unmarshal(req.data, &e); err != nil {
				return nil, status.Errorf(codes.InvalidArgument, "bad Error request: %v", err)
			}
			return nil, status.Error(codes.Code(e.Code), e.Message)
		},
		"Sleep": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			req := &rawMessage{}
			if err := unmarshal(req); err != nil {
				return nil, err
			}
			var s sleepRequest
			if err := json.Unmarshal(req.data, &s); err != nil {
				return nil, status.Errorf(codes.InvalidArgument, "bad Sleep request: %v", err)
			}
			seen := timeoutMs(ctx)
			timer := time.NewTimer(time.Duration(s.Ms) * time.Millisecond)
			defer timer.Stop()
			select {
			case <-timer.C:
				event(result{"event": "sleep", "outcome": "done", "timeout_ms": seen})
				out, _ := json.Marshal(result{"timeout_ms": seen})
				return &rawMessage{data: out}, nil
			case <-ctx.Done():
				event(result{"event": "sleep", "outcome": "cancelled", "timeout_ms": seen, "error": ctx.Err().Error()})
				return nil, ctx.Err()
			}
		},
		"Metadata": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			md, _ := ttrpc.GetMetadata(ctx)
			if md == nil {
				md = ttrpc.MD{}
			}
			out, _ := json.Marshal(result{"metadata": md})
			return &rawMessage{data: out}, nil
		},
	}
}

func runServer(path string) {
	_ = os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		fail("listen %s: %v", path, err)
	}
	s, err := ttrpc.NewServer()
	if err != nil {
		fail("ttrpc.NewServer: %v", err)
	}
	s.Register(echoService, echoMethods())
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = s.Shutdown(ctx)
		_ = os.Remove(path)
		os.Exit(0)
	}()
	event(result{"event": "listening", "socket": path, "pid": os.Getpid()})
	if err := s.Serve(context.Background(), l); err != nil && !errors.Is(err, ttrpc.ErrServerClosed) {
		fail("serve: %v", err)
	}
}

// ---- client side

func dial(path string) *ttrpc.Client {
	conn, err := net.DialTimeout("unix", path, 10*time.Second)
	if err != nil {
		fail("dial %s: %v", path, err)
	}
	return ttrpc.NewClient(conn)
}

func callRaw(ctx context.Context, c *ttrpc.Client, service, method string, payload []byte) ([]byte, error) {
	resp := &rawMessage{}
	err := c.Call(ctx, service, method, &rawMessage{data: payload}, resp)
	return resp.data, err
}

func withTimeout(seconds string) (context.Context, context.CancelFunc) {
	if seconds == "" {
		return context.WithCancel(context.Background())
	}
	s, err := strconv.ParseFloat(seconds, 64)
	if err != nil {
		fail("bad timeout %q", seconds)
	}
	if s <= 0 {
		return context.WithCancel(context.Background())
	}
	return context.WithTimeout(context.Background(), time.Duration(s*float64(time.Second)))
}

func arg(args []string, i int) string {
	if i < len(args) {
		return args[i]
	}
	return ""
}

func atoi(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		fail("not a number: %q", s)
	}
	return n
}

func runClient(path, mode string, args []string) {
	c := dial(path)
	defer c.Close()
	start := time.Now()
	switch mode {
	case "unary":
		out, err := callRaw(context.Background(), c, echoService, "Echo", []byte(arg(args, 0)))
		if err != nil {
			emit(errResult(err, time.Since(start)))
			return
		}
		emit(result{"ok": true, "payload": string(out), "elapsed_ms": ms(time.Since(start))})
	case "concurrent":
		n := atoi(arg(args, 0))
		size := 0
		if len(args) > 1 {
			size = atoi(args[1])
		}
		var wg sync.WaitGroup
		var mu sync.Mutex
		mismatches, failures := 0, 0
		var firstErr string
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				msg := []byte(fmt.Sprintf("call-%d-", i) + strings.Repeat("x", size))
				out, err := callRaw(context.Background(), c, echoService, "Echo", msg)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					failures++
					if firstErr == "" {
						firstErr = err.Error()
					}
				} else if string(out) != string(msg) {
					mismatches++
				}
			}(i)
		}
		wg.Wait()
		emit(result{"ok": failures == 0 && mismatches == 0, "calls": n, "errors": failures,
			"mismatches": mismatches, "first_error": firstErr, "elapsed_ms": ms(time.Since(start))})
	case "error":
		payload, _ := json.Marshal(errorRequest{Code: atoi(arg(args, 0)), Message: arg(args, 1)})
		_, err := callRaw(context.Background(), c, echoService, "Error", payload)
		if err == nil {
			emit(result{"ok": true})
			return
		}
		emit(errResult(err, time.Since(start)))
	case "deadline":
		timeout := time.Duration(atoi(arg(args, 0))) * time.Millisecond
		payload, _ := json.Marshal(sleepRequest{Ms: int64(atoi(arg(args, 1)))})
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		out, err := callRaw(ctx, c, echoService, "Sleep", payload)
		elapsed := time.Since(start)
		if len(args) > 2 { // keep the connection open a while: the server must give up by the deadline alone
			time.Sleep(time.Duration(atoi(args[2])) * time.Millisecond)
		}
		if err != nil {
			emit(errResult(err, elapsed))
			return
		}
		emit(result{"ok": true, "payload": string(out), "elapsed_ms": ms(elapsed)})
	case "metadata":
		md := ttrpc.MD{}
		for _, kv := range args {
			k, v, _ := strings.Cut(kv, "=")
			md.Append(k, v)
		}
		ctx := ttrpc.WithMetadata(context.Background(), md)
		out, err := callRaw(ctx, c, echoService, "Metadata", nil)
		if err != nil {
			emit(errResult(err, time.Since(start)))
			return
		}
		var decoded interface{}
		if json.Unmarshal(out, &decoded) != nil {
			decoded = string(out)
		}
		emit(result{"ok": true, "reply": decoded, "elapsed_ms": ms(time.Since(start))})
	default:
		fail("unknown client mode %q", mode)
	}
}

// bench: keep `inflight` Echo calls of `size` bytes running on one connection for `seconds`.
func runBench(path string, inflight, size int, seconds float64) {
	c := dial(path)
	defer c.Close()
	payload := []byte(strings.Repeat("b", size))
	// warm-up
	for i := 0; i < 20; i++ {
		if _, err := callRaw(context.Background(), c, echoService, "Echo", payload); err != nil {
			fail("warm-up: %v", err)
		}
	}
	deadline := time.Now().Add(time.Duration(seconds * float64(time.Second)))
	var mu sync.Mutex
	var lat []time.Duration
	var failures int
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < inflight; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			local := make([]time.Duration, 0, 1024)
			bad := 0
			for time.Now().Before(deadline) {
				t0 := time.Now()
				out, err := callRaw(context.Background(), c, echoService, "Echo", payload)
				if err != nil || len(out) != size {
					bad++
					continue
				}
				local = append(local, time.Since(t0))
			}
			mu.Lock()
			lat = append(lat, local...)
			failures += bad
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	pct := func(p float64) float64 {
		if len(lat) == 0 {
			return 0
		}
		return float64(lat[int(p*float64(len(lat)-1))].Microseconds())
	}
	emit(result{"ok": failures == 0, "calls": len(lat), "errors": failures, "seconds": elapsed.Seconds(),
		"calls_per_s": float64(len(lat)) / elapsed.Seconds(), "p50_us": pct(0.50), "p99_us": pct(0.99),
		"mb_per_s": float64(len(lat)) * float64(size) / elapsed.Seconds() / 1e6})
}

// ---- shim modes: the calls the Kata shim makes, one fresh connection per call like remote.go

func shimCall(path, service, method string, payload []byte, timeout string) ([]byte, result) {
	c := dial(path)
	defer c.Close()
	ctx, cancel := withTimeout(timeout)
	defer cancel()
	start := time.Now()
	out, err := callRaw(ctx, c, service, method, payload)
	if err != nil {
		return nil, errResult(err, time.Since(start))
	}
	return out, result{"ok": true, "code": 0, "message": "", "elapsed_ms": ms(time.Since(start))}
}

func decodeInto(r result, out []byte, names map[int]string) {
	fields, err := stringFields(out)
	if err != nil {
		r["ok"] = false
		r["code"] = int(codes.Internal)
		r["message"] = "undecodable response: " + err.Error()
		return
	}
	for num, name := range names {
		r[name] = fields[num]
	}
}

func runShim(mode string, args []string) {
	if len(args) < 1 {
		fail("%s: socket path required", mode)
	}
	path := args[0]
	args = args[1:]
	switch mode {
	case "hv-create":
		if len(args) < 2 {
			fail("hv-create <sock> <id> <netns> [k=v ...]")
		}
		var b []byte
		b = appendString(b, 1, args[0])
		for _, kv := range args[2:] {
			k, v, _ := strings.Cut(kv, "=")
			var entry []byte
			entry = appendBytesField(entry, 1, []byte(k))
			entry = appendBytesField(entry, 2, []byte(v))
			b = appendBytesField(b, 2, entry)
		}
		b = appendString(b, 3, args[1])
		out, r := shimCall(path, "hypervisor.Hypervisor", "CreateVM", b, "")
		if r["ok"] == true {
			decodeInto(r, out, map[int]string{1: "agentSocketPath"})
		}
		emit(r)
	case "hv-start":
		if len(args) < 1 {
			fail("hv-start <sock> <id> [timeout-seconds]")
		}
		_, r := shimCall(path, "hypervisor.Hypervisor", "StartVM", appendString(nil, 1, args[0]), arg(args, 1))
		emit(r)
	case "hv-stop":
		if len(args) < 1 {
			fail("hv-stop <sock> <id> [timeout-seconds]")
		}
		_, r := shimCall(path, "hypervisor.Hypervisor", "StopVM", appendString(nil, 1, args[0]), arg(args, 1))
		emit(r)
	case "hv-version":
		out, r := shimCall(path, "hypervisor.Hypervisor", "Version", appendString(nil, 1, arg(args, 0)), "")
		if r["ok"] == true {
			decodeInto(r, out, map[int]string{1: "version"})
		}
		emit(r)
	case "info":
		if len(args) < 2 {
			fail("info <sock> <pod> <ns> [wait] [timeout-seconds]")
		}
		wait := false
		switch arg(args, 2) {
		case "", "false", "0", "nowait":
		case "wait", "true", "1":
			wait = true
		default:
			fail("info: wait must be wait|true|1|false|0, got %q", args[2])
		}
		var b []byte
		b = appendString(b, 1, args[0])
		b = appendString(b, 2, args[1])
		b = appendBool(b, 3, wait)
		out, r := shimCall(path, "podvminfo.PodVMInfo", "GetInfo", b, arg(args, 3))
		if r["ok"] == true {
			decodeInto(r, out, map[int]string{1: "VMID"})
		}
		emit(r)
	case "raw-call":
		if len(args) < 3 {
			fail("raw-call <sock> <service> <method> <hex payload> [timeout-seconds]")
		}
		payload, err := hex.DecodeString(args[2])
		if err != nil {
			fail("bad hex payload: %v", err)
		}
		out, r := shimCall(path, args[0], args[1], payload, arg(args, 3))
		if r["ok"] == true {
			r["payload"] = hex.EncodeToString(out)
		}
		emit(r)
	}
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: ttrpcpeer server|client|bench|hv-create|hv-start|hv-stop|hv-version|info|raw-call ...")
	}
	mode, args := os.Args[1], os.Args[2:]
	switch mode {
	case "server":
		if len(args) != 1 {
			fail("server <sock>")
		}
		runServer(args[0])
	case "client":
		if len(args) < 2 {
			fail("client <sock> unary|concurrent|error|deadline|metadata ...")
		}
		runClient(args[0], args[1], args[2:])
	case "bench":
		if len(args) != 4 {
			fail("bench <sock> <inflight> <size> <seconds>")
		}
		secs, err := strconv.ParseFloat(args[3], 64)
		if err != nil {
			fail("bad seconds %q", args[3])
		}
		runBench(args[0], atoi(args[1]), atoi(args[2]), secs)
	case "hv-create", "hv-start", "hv-stop", "hv-version", "info", "raw-call":
		runShim(mode, args)
	default:
		fail("unknown mode %q", mode)
	}
}
