//! The load generator: runs inside the client pod and prints one JSON object.
//!
//! - [`bulk`]: N streams write as fast as they can for a fixed time; the sink answers each
//!   stream's EOF with the byte count it received, so the figure counts bytes that arrived
//!   (not bytes still in socket buffers) and the time runs until the last count is back.
//! - [`bulk_reverse`]: the other way: N streams read from a source server for a fixed time and
//!   count what arrived.
//! - [`rr`]: open loop. Every request has a scheduled send time; the writer sends on schedule
//!   whatever the replies do, and latency runs from the scheduled time to the reply, so a
//!   stall shows in every request it delays (no coordinated omission).
//! - [`http`]: the same open loop with HTTP/1.1 GETs on keep-alive connections: requests go
//!   out on schedule whether or not the previous response is back (pipelined, in order), so
//!   the offered rate stays fixed through a stall and latency still runs from the schedule.
//! - [`pingpong`]: closed loop on one connection: the next message leaves when the previous
//!   one is back, so the rate is round trips per second and latency is each round trip.
//! - [`connect`]: closed loop of connect, 1-byte echo, EOF, close.
//!
//! Blocking threads for `rr`, `http` and `connect`: timing precision matters there and a thread per
//! connection keeps the schedule independent of any runtime's timer wheel (1 ms ticks).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest latency a histogram holds (ns); larger values are clamped to it.
const MAX_LATENCY_NS: u64 = 60_000_000_000;
/// How long one blocking socket operation may take before the run fails.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Write size of bulk streams.
const BULK_CHUNK: usize = 256 * 1024;
/// What the HTTP test requests (the bench server answers every path alike).
const HTTP_PATH: &str = "/bench";
/// Bounds on a response head the HTTP client accepts: line length and header count.
const HTTP_MAX_LINE: u64 = 8192;
const HTTP_MAX_HEADERS: usize = 100;
/// Bounds on a chunked response body: chunks, and trailer lines after the last one.
const HTTP_MAX_CHUNKS: usize = 10_000;
/// Pause between attempts of [`http_probe`].
const PROBE_PAUSE: Duration = Duration::from_millis(100);

/// A latency histogram in nanoseconds, 3 significant digits.
pub fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).context("creating a latency histogram")
}

/// The histogram as `[[value_ns, count], ...]`, so the orchestrator can merge rounds.
pub fn histogram_buckets(h: &Histogram<u64>) -> Value {
    h.iter_recorded()
        .map(|v| json!([v.value_iterated_to(), v.count_at_value()]))
        .collect()
}

/// Rebuilds a histogram from [`histogram_buckets`] output.
pub fn histogram_from_buckets(buckets: &Value) -> Result<Histogram<u64>> {
    let mut h = new_histogram()?;
    for b in buckets.as_array().context("histogram is not an array")? {
        let (Some(value), Some(count)) = (b[0].as_u64(), b[1].as_u64()) else {
            bail!("bad histogram bucket {b}");
        };
        h.record_n(value.min(MAX_LATENCY_NS), count)
            .context("recording a histogram bucket")?;
    }
    Ok(h)
}

/// Percentiles in microseconds.
pub fn percentiles_us(h: &Histogram<u64>) -> Value {
    let us = |ns: u64| ns as f64 / 1000.0;
    json!({
        "p50_us": us(h.value_at_quantile(0.50)),
        "p90_us": us(h.value_at_quantile(0.90)),
        "p99_us": us(h.value_at_quantile(0.99)),
        "p999_us": us(h.value_at_quantile(0.999)),
        "max_us": us(h.max()),
        "samples": h.len(),
    })
}

/// `streams` connections to `to`, all established before any bytes move.
async fn connect_streams(to: SocketAddr, streams: usize) -> Result<Vec<tokio::net::TcpStream>> {
    ensure!(streams > 0, "streams must be at least 1");
    let mut conns = Vec::with_capacity(streams);
    for _ in 0..streams {
        let conn = tokio::time::timeout(IO_TIMEOUT, tokio::net::TcpStream::connect(to))
            .await
            .with_context(|| format!("connecting to {to} timed out"))?
            .with_context(|| format!("connecting to {to}"))?;
        conns.push(conn);
    }
    Ok(conns)
}

/// Bulk throughput client -> server over `streams` connections for `duration`.
pub async fn bulk(to: SocketAddr, streams: usize, duration: Duration) -> Result<Value> {
    let conns = connect_streams(to, streams).await?;
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for mut conn in conns {
        tasks.spawn(async move {
            let buf = vec![0x5au8; BULK_CHUNK];
            let mut sent: u64 = 0;
            while Instant::now() < deadline {
                let n = tokio::time::timeout(IO_TIMEOUT, conn.write(&buf))
                    .await
                    .context("bulk write stalled")?
                    .context("bulk write")?;
                sent += n as u64;
            }
            conn.shutdown()
                .await
                .context("shutting down the bulk stream")?;
            let mut count = [0u8; 8];
            tokio::time::timeout(IO_TIMEOUT * 3, conn.read_exact(&mut count))
                .await
                .context("the sink did not report its byte count in time")?
                .context("reading the sink's byte count")?;
            let received = u64::from_le_bytes(count);
            ensure!(
                received == sent,
                "the sink received {received} bytes of the {sent} sent"
            );
            anyhow::Ok(sent)
        });
    }
    bulk_result(tasks, start, streams, false).await
}

/// Bulk throughput server -> client: `streams` connections to a source server, each read for
/// `duration`; counts the bytes that arrived.
pub async fn bulk_reverse(to: SocketAddr, streams: usize, duration: Duration) -> Result<Value> {
    let conns = connect_streams(to, streams).await?;
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for mut conn in conns {
        tasks.spawn(async move {
            let mut buf = vec![0u8; BULK_CHUNK];
            let mut received: u64 = 0;
            while Instant::now() < deadline {
                let n = tokio::time::timeout(IO_TIMEOUT, conn.read(&mut buf))
                    .await
                    .context("bulk read stalled")?
                    .context("bulk read")?;
                ensure!(n > 0, "the source closed the stream early");
                received += n as u64;
            }
            // Dropping the connection ends the source's writes.
            anyhow::Ok(received)
        });
    }
    bulk_result(tasks, start, streams, true).await
}

/// Waits for every stream's byte count and reports the aggregate rate since `start`.
async fn bulk_result(
    mut tasks: tokio::task::JoinSet<Result<u64>>,
    start: Instant,
    streams: usize,
    reverse: bool,
) -> Result<Value> {
    let mut total: u64 = 0;
    while let Some(joined) = tasks.join_next().await {
        total += joined.context("bulk stream task")??;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "streams": streams,
        "reverse": reverse,
        "bytes": total,
        "secs": secs,
        "gbps": total as f64 * 8.0 / secs / 1e9,
    }))
}

/// Closed-loop ping-pong of `size`-byte messages on one connection to an echo server for
/// `duration`: round trips per second and the latency of each.
pub fn pingpong(to: SocketAddr, size: usize, duration: Duration) -> Result<Value> {
    ensure!(size > 0, "size must be positive");
    let s = connect_blocking(to)?;
    let out = vec![0x42u8; size];
    let mut back = vec![0u8; size];
    // One round trip first: the path is set up before timing.
    (&s).write_all(&out).context("warm-up message")?;
    (&s).read_exact(&mut back).context("warm-up reply")?;
    let mut hist = new_histogram()?;
    let start = Instant::now();
    let deadline = start + duration;
    while Instant::now() < deadline {
        let t0 = Instant::now();
        (&s).write_all(&out).context("sending a message")?;
        (&s).read_exact(&mut back).context("reading the echo")?;
        let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(MAX_LATENCY_NS);
        hist.saturating_record(ns.max(1));
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = s.shutdown(Shutdown::Both);
    let mut out = percentiles_us(&hist);
    out["size"] = json!(size);
    out["secs"] = json!(secs);
    out["round_trips"] = json!(hist.len());
    out["per_s"] = json!(hist.len() as f64 / secs.max(1e-9));
    out["hist"] = histogram_buckets(&hist);
    Ok(out)
}

/// Open-loop request/response: `rate` requests per second of `size` bytes, spread evenly over
/// `conns` connections to an echo server, for `duration`.
pub fn rr(
    to: SocketAddr,
    conns: usize,
    rate: u64,
    size: usize,
    duration: Duration,
) -> Result<Value> {
    ensure!(
        conns > 0 && rate > 0 && size > 0,
        "conns, rate and size must be positive"
    );
    let per_conn = (duration.as_secs_f64() * rate as f64 / conns as f64).ceil() as u64;
    let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        let s = connect_blocking(to)?;
        // One round trip first: the path (tunnel, certificates) is set up before timing.
        let mut buf = vec![0u8; size];
        (&s).write_all(&buf).context("warm-up request")?;
        (&s).read_exact(&mut buf).context("warm-up reply")?;
        streams.push(s);
    }
    // Connections start a fraction of an interval apart, so sends are spread over time.
    let start = Instant::now() + Duration::from_millis(50);
    let mut handles = Vec::new();
    for (k, stream) in streams.into_iter().enumerate() {
        let first = start + interval.mul_f64(k as f64 / conns as f64);
        let reader = stream.try_clone().context("cloning the socket")?;
        let (tx, rx) = mpsc::channel::<Instant>();
        let writer = thread::spawn(move || -> Result<()> {
            precise_sleeps();
            let buf = vec![0x42u8; size];
            for i in 0..per_conn {
                let scheduled = first + interval.mul_f64(i as f64);
                let now = Instant::now();
                if scheduled > now {
                    thread::sleep(scheduled - now);
                }
                // The reader may have failed and gone: then its error is the one to report.
                if tx.send(scheduled).is_err() {
                    return Ok(());
                }
                (&stream).write_all(&buf).context("sending a request")?;
            }
            Ok(())
        });
        let reader = thread::spawn(move || -> Result<(Histogram<u64>, Instant)> {
            let mut hist = new_histogram()?;
            let mut buf = vec![0u8; size];
            let mut last = Instant::now();
            for _ in 0..per_conn {
                let scheduled = rx
                    .recv_timeout(IO_TIMEOUT)
                    .context("the writer stopped sending")?;
                (&reader).read_exact(&mut buf).context("reading a reply")?;
                last = Instant::now();
                let ns = u64::try_from(last.saturating_duration_since(scheduled).as_nanos())
                    .unwrap_or(MAX_LATENCY_NS);
                hist.saturating_record(ns.max(1));
            }
            let _ = reader.shutdown(Shutdown::Both);
            Ok((hist, last))
        });
        handles.push((writer, reader));
    }
    let mut hist = new_histogram()?;
    let mut end = start;
    for (writer, reader) in handles {
        let read = join(reader, "rr reader")?;
        join(writer, "rr writer")?;
        let (h, last) = read;
        hist.add(&h).context("merging histograms")?;
        end = end.max(last);
    }
    let secs = end.saturating_duration_since(start).as_secs_f64();
    let mut out = percentiles_us(&hist);
    out["conns"] = json!(conns);
    out["rate"] = json!(rate);
    out["size"] = json!(size);
    out["secs"] = json!(secs);
    out["achieved_rps"] = json!(hist.len() as f64 / secs.max(1e-9));
    out["hist"] = histogram_buckets(&hist);
    Ok(out)
}

/// Open-loop HTTP/1.1: `rate` GETs per second spread evenly over `conns` keep-alive
/// connections to `to`, for `duration`. Latency runs from each request's scheduled send time to
/// the end of its response body; only `200` responses are in the histogram, the others are
/// counted by status (`failed`, `statuses`). A broken connection fails the run.
pub fn http(to: SocketAddr, conns: usize, rate: u64, duration: Duration) -> Result<Value> {
    ensure!(conns > 0 && rate > 0, "conns and rate must be positive");
    let per_conn = (duration.as_secs_f64() * rate as f64 / conns as f64).ceil() as u64;
    let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
    let request = http_request(to);
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        let s = connect_blocking(to)?;
        let mut reader = BufReader::new(s.try_clone().context("cloning the socket")?);
        // One request first: the path (tunnels, certificates, the waypoint's upstream
        // connection) is set up before timing, and a path that does not answer 200 fails here.
        (&s).write_all(&request).context("warm-up request")?;
        let (status, _) = read_response(&mut reader, &mut Vec::new()).context("warm-up reply")?;
        ensure!(status == 200, "warm-up request to {to} answered {status}");
        streams.push((s, reader));
    }
    let start = Instant::now() + Duration::from_millis(50);
    let mut handles = Vec::new();
    for (k, (stream, mut reader)) in streams.into_iter().enumerate() {
        let first = start + interval.mul_f64(k as f64 / conns as f64);
        let (tx, rx) = mpsc::channel::<Instant>();
        let request = request.clone();
        let writer = thread::spawn(move || -> Result<()> {
            precise_sleeps();
            for i in 0..per_conn {
                let scheduled = first + interval.mul_f64(i as f64);
                let now = Instant::now();
                if scheduled > now {
                    thread::sleep(scheduled - now);
                }
                // The reader may have failed and gone: then its error is the one to report.
                if tx.send(scheduled).is_err() {
                    return Ok(());
                }
                (&stream).write_all(&request).context("sending a request")?;
            }
            Ok(())
        });
        let reader = thread::spawn(move || -> Result<HttpTally> {
            let mut tally = HttpTally::new()?;
            let mut line = Vec::new();
            for _ in 0..per_conn {
                let scheduled = rx
                    .recv_timeout(IO_TIMEOUT)
                    .context("the writer stopped sending")?;
                let (status, bytes) =
                    read_response(&mut reader, &mut line).context("reading a response")?;
                tally.last = Instant::now();
                tally.body_bytes += bytes;
                *tally.statuses.entry(status).or_default() += 1;
                if status == 200 {
                    let ns =
                        u64::try_from(tally.last.saturating_duration_since(scheduled).as_nanos())
                            .unwrap_or(MAX_LATENCY_NS);
                    tally.hist.saturating_record(ns.max(1));
                }
            }
            let _ = reader.get_ref().shutdown(Shutdown::Both);
            Ok(tally)
        });
        handles.push((writer, reader));
    }
    let mut total = HttpTally::new()?;
    total.last = start;
    for (writer, reader) in handles {
        let t = join(reader, "http reader")?;
        join(writer, "http writer")?;
        total.hist.add(&t.hist).context("merging histograms")?;
        total.last = total.last.max(t.last);
        total.body_bytes += t.body_bytes;
        for (status, n) in t.statuses {
            *total.statuses.entry(status).or_default() += n;
        }
    }
    let secs = total.last.saturating_duration_since(start).as_secs_f64();
    let responses: u64 = total.statuses.values().sum();
    let ok = total.statuses.get(&200).copied().unwrap_or(0);
    let mut out = percentiles_us(&total.hist);
    out["conns"] = json!(conns);
    out["rate"] = json!(rate);
    out["secs"] = json!(secs);
    out["responses"] = json!(responses);
    out["ok"] = json!(ok);
    out["failed"] = json!(responses - ok);
    out["statuses"] = json!(
        total
            .statuses
            .iter()
            .map(|(s, n)| (s.to_string(), *n))
            .collect::<BTreeMap<_, _>>()
    );
    out["body_bytes_per_response"] = json!(total.body_bytes as f64 / responses.max(1) as f64);
    out["achieved_rps"] = json!(responses as f64 / secs.max(1e-9));
    out["hist"] = histogram_buckets(&total.hist);
    Ok(out)
}

/// What one connection of [`http`] saw.
struct HttpTally {
    hist: Histogram<u64>,
    statuses: BTreeMap<u16, u64>,
    body_bytes: u64,
    last: Instant,
}

impl HttpTally {
    fn new() -> Result<Self> {
        Ok(Self {
            hist: new_histogram()?,
            statuses: BTreeMap::new(),
            body_bytes: 0,
            last: Instant::now(),
        })
    }
}

/// One GET at a time to `to` until one is answered `200` or `within` has passed: the
/// orchestrator's check that a freshly configured path (a waypoint learning its Services
/// from the controller) serves before anything is timed.
pub fn http_probe(to: SocketAddr, within: Duration) -> Result<Value> {
    let started = Instant::now();
    let deadline = started + within;
    let request = http_request(to);
    let mut attempts: u64 = 0;
    let mut last = String::new();
    // Bounded by the deadline: every attempt is bounded by the socket timeouts.
    while Instant::now() < deadline {
        attempts += 1;
        let attempt = connect_blocking(to).and_then(|s| {
            (&s).write_all(&request).context("sending the request")?;
            let mut reader = BufReader::new(&s);
            read_response(&mut reader, &mut Vec::new())
        });
        match attempt {
            Ok((200, _)) => {
                return Ok(json!({
                    "attempts": attempts,
                    "secs": started.elapsed().as_secs_f64(),
                }));
            }
            Ok((status, _)) => last = format!("status {status}"),
            Err(e) => last = format!("{e:#}"),
        }
        thread::sleep(PROBE_PAUSE);
    }
    bail!("no 200 from {to} within {within:?} ({attempts} attempts); last: {last}")
}

/// The request every HTTP test sends: a GET without a body on a keep-alive connection.
fn http_request(to: SocketAddr) -> Vec<u8> {
    format!("GET {HTTP_PATH} HTTP/1.1\r\nHost: {to}\r\nUser-Agent: trellis-bench\r\n\r\n")
        .into_bytes()
}

/// Reads one HTTP/1.1 response (head, then a `Content-Length` or chunked body, discarded);
/// returns its status and body length. `line` is a scratch buffer.
fn read_response(r: &mut impl BufRead, line: &mut Vec<u8>) -> Result<(u16, u64)> {
    read_line(r, line).context("status line")?;
    let status_line = String::from_utf8_lossy(line);
    let status: u16 = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad status line {:?}", status_line.trim_end()))?;
    let (mut length, mut chunked, mut ended) = (None, false, false);
    for _ in 0..HTTP_MAX_HEADERS {
        read_line(r, line).context("header line")?;
        if line.as_slice() == b"\r\n" || line.as_slice() == b"\n" {
            ended = true;
            break;
        }
        let text = String::from_utf8_lossy(line);
        let Some((name, value)) = text.split_once(':') else {
            bail!("bad header line {:?}", text.trim_end());
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<u64>()
                    .with_context(|| format!("bad content-length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().ends_with("chunked");
        }
    }
    ensure!(ended, "more than {HTTP_MAX_HEADERS} header lines");
    ensure!(
        !(100..200).contains(&status),
        "unexpected interim response {status}"
    );
    let body = if chunked {
        read_chunked(r, line)?
    } else if let Some(n) = length {
        discard(r, n)?;
        n
    } else if matches!(status, 204 | 304) {
        0
    } else {
        bail!("response {status} has neither content-length nor chunked encoding");
    };
    Ok((status, body))
}

/// Reads and discards a chunked body and its trailers; returns the body length.
fn read_chunked(r: &mut impl BufRead, line: &mut Vec<u8>) -> Result<u64> {
    let mut total = 0;
    for _ in 0..HTTP_MAX_CHUNKS {
        read_line(r, line).context("chunk size")?;
        let text = String::from_utf8_lossy(line);
        let size = text.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size, 16)
            .with_context(|| format!("bad chunk size {:?}", text.trim_end()))?;
        if size == 0 {
            for _ in 0..HTTP_MAX_HEADERS {
                read_line(r, line).context("trailer")?;
                if line.as_slice() == b"\r\n" || line.as_slice() == b"\n" {
                    return Ok(total);
                }
            }
            bail!("more than {HTTP_MAX_HEADERS} trailer lines");
        }
        discard(r, size)?;
        read_line(r, line).context("end of chunk")?;
        total += size;
    }
    bail!("more than {HTTP_MAX_CHUNKS} chunks in one response")
}

/// One line (up to and with its `\n`) into `line`; fails on EOF or an overlong line.
fn read_line(r: &mut impl BufRead, line: &mut Vec<u8>) -> Result<()> {
    line.clear();
    let n = r
        .by_ref()
        .take(HTTP_MAX_LINE)
        .read_until(b'\n', line)
        .context("reading")?;
    ensure!(n > 0, "connection closed");
    ensure!(
        line.ends_with(b"\n"),
        "line longer than {HTTP_MAX_LINE} bytes or cut short"
    );
    Ok(())
}

fn discard(r: &mut impl BufRead, n: u64) -> Result<()> {
    let copied = std::io::copy(&mut r.by_ref().take(n), &mut std::io::sink()).context("body")?;
    ensure!(copied == n, "body cut short: {copied} of {n} bytes");
    Ok(())
}

/// Closed loop of new connections (connect, 1 byte each way, EOF, close) on `conns` threads
/// for `duration`. The server closes first, so no client port is left in TIME_WAIT.
pub fn connect(to: SocketAddr, conns: usize, duration: Duration) -> Result<Value> {
    ensure!(conns > 0, "conns must be at least 1");
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            thread::spawn(
                move || -> Result<(u64, u64, Option<String>, Histogram<u64>)> {
                    let mut hist = new_histogram()?;
                    let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None);
                    while Instant::now() < deadline {
                        let t0 = Instant::now();
                        match one_connection(to) {
                            Ok(()) => {
                                ok += 1;
                                let ns = u64::try_from(t0.elapsed().as_nanos())
                                    .unwrap_or(MAX_LATENCY_NS);
                                hist.saturating_record(ns.max(1));
                            }
                            Err(e) => {
                                failed += 1;
                                first_error.get_or_insert_with(|| format!("{e:#}"));
                            }
                        }
                    }
                    Ok((ok, failed, first_error, hist))
                },
            )
        })
        .collect();
    let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None);
    let mut hist = new_histogram()?;
    for h in handles {
        let (o, f, e, h) = join(h, "connect worker")?;
        ok += o;
        failed += f;
        first_error = first_error.or(e);
        hist.add(&h).context("merging histograms")?;
    }
    let secs = start.elapsed().as_secs_f64();
    let mut out = json!({
        "conns": conns,
        "ok": ok,
        "failed": failed,
        "first_error": first_error,
        "secs": secs,
        "per_s": ok as f64 / secs,
    });
    out["connection_latency"] = percentiles_us(&hist);
    Ok(out)
}

/// One connection to a `one` server (1-byte echo) at a time until one completes or `within`
/// has passed: the orchestrator's check that a path (a `--peer`) carries traffic.
pub fn probe(to: SocketAddr, within: Duration) -> Result<Value> {
    let started = Instant::now();
    let deadline = started + within;
    let mut attempts: u64 = 0;
    let mut last = String::new();
    // Bounded by the deadline: every attempt is bounded by the socket timeouts.
    while Instant::now() < deadline {
        attempts += 1;
        match one_connection(to) {
            Ok(()) => {
                return Ok(json!({
                    "attempts": attempts,
                    "secs": started.elapsed().as_secs_f64(),
                }));
            }
            Err(e) => last = format!("{e:#}"),
        }
        thread::sleep(PROBE_PAUSE);
    }
    bail!("no echo from {to} within {within:?} ({attempts} attempts); last: {last}")
}

/// The line [`hold`] prints once every connection is established end to end.
pub const HOLDING: &str = "\"holding\"";

/// Opens `conns` connections to an echo server, completes a 1-byte round trip on each (so
/// every proxy on the way holds an established flow), prints a `{"holding": N}` line and keeps
/// them open and silent for `hold` before closing them.
pub fn hold(to: SocketAddr, conns: usize, hold: Duration) -> Result<Value> {
    raise_fd_limit();
    let mut held = Vec::with_capacity(conns);
    for i in 0..conns {
        let mut s = connect_blocking(to).with_context(|| format!("connection {}", i + 1))?;
        s.write_all(&[7]).context("writing the byte")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).context("reading the echo")?;
        held.push(s);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{{{HOLDING}: {conns}}}").context("printing the ready line")?;
    out.flush().context("printing the ready line")?;
    drop(out);
    thread::sleep(hold);
    drop(held);
    Ok(json!({ "conns": conns }))
}

fn one_connection(to: SocketAddr) -> Result<()> {
    let mut s = connect_blocking(to)?;
    s.write_all(&[7]).context("writing the byte")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).context("reading the echo")?;
    ensure!(b[0] == 7, "echo returned {} instead of 7", b[0]);
    // Wait for the server's close: the connection is complete end to end.
    let n = s.read(&mut b).context("waiting for EOF")?;
    ensure!(n == 0, "unexpected bytes after the echo");
    Ok(())
}

fn connect_blocking(to: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to, IO_TIMEOUT)
        .with_context(|| format!("connecting to {to}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Lifts the soft descriptor limit to the hard one: [`hold`] needs one per connection (the
/// orchestrator raised the hard limit for everything it starts).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                eprintln!("bench: cannot raise the descriptor limit to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => eprintln!("bench: cannot read the descriptor limit: {e}"),
    }
}

/// Timer slack of 1 ns for this thread: the default 50 us would show up as latency.
fn precise_sleeps() {
    if let Err(e) = nix::sys::prctl::set_timerslack(1) {
        eprintln!("bench: cannot lower the timer slack ({e}); send times may lag by ~50 us");
    }
}

fn join<T>(handle: thread::JoinHandle<Result<T>>, what: &str) -> Result<T> {
    match handle.join() {
        Ok(r) => r.with_context(|| what.to_owned()),
        Err(_) => bail!("{what} thread panicked"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<(u16, u64)> {
        read_response(&mut &bytes[..], &mut Vec::new())
    }

    #[test]
    fn reads_pipelined_responses_in_order() {
        let two = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhelloHTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        let mut r = &two[..];
        let mut line = Vec::new();
        assert_eq!(read_response(&mut r, &mut line).expect("first"), (200, 5));
        assert_eq!(read_response(&mut r, &mut line).expect("second"), (503, 0));
        assert!(r.is_empty(), "both responses consumed exactly");
    }

    #[test]
    fn reads_chunked_bodies_with_trailers() {
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nabcd\r\n2\r\nef\r\n0\r\nx-trailer: 1\r\n\r\n";
        assert_eq!(parse(chunked).expect("chunked"), (200, 6));
    }

    #[test]
    fn refuses_what_it_cannot_frame() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 abc OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n",
            b"",
        ] {
            assert!(
                parse(bad).is_err(),
                "{:?} parsed",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse(b"HTTP/1.1 204 No Content\r\n\r\n").expect("204"),
            (204, 0)
        );
    }
}
