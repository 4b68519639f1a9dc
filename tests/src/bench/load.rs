//! The load generator: runs inside the client pod and prints one JSON object.
//!
//! - [`bulk`]: N streams write as fast as they can for a fixed time; the sink answers each
//!   stream's EOF with the byte count it received, so the figure counts bytes that arrived
//!   (not bytes still in socket buffers) and the time runs until the last count is back.
//! - [`rr`]: open loop. Every request has a scheduled send time; the writer sends on schedule
//!   whatever the replies do, and latency runs from the scheduled time to the reply, so a
//!   stall shows in every request it delays (no coordinated omission).
//! - [`connect`]: closed loop of connect, 1-byte echo, EOF, close.
//!
//! Blocking threads for `rr` and `connect`: timing precision matters there and a thread per
//! connection keeps the schedule independent of any runtime's timer wheel (1 ms ticks).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

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

/// Bulk throughput client -> server over `streams` connections for `duration`.
pub async fn bulk(to: SocketAddr, streams: usize, duration: Duration) -> Result<Value> {
    ensure!(streams > 0, "streams must be at least 1");
    let mut conns = Vec::with_capacity(streams);
    for _ in 0..streams {
        let conn = tokio::time::timeout(IO_TIMEOUT, tokio::net::TcpStream::connect(to))
            .await
            .with_context(|| format!("connecting to {to} timed out"))?
            .with_context(|| format!("connecting to {to}"))?;
        conns.push(conn);
    }
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
    let mut total: u64 = 0;
    while let Some(joined) = tasks.join_next().await {
        total += joined.context("bulk stream task")??;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "streams": streams,
        "bytes": total,
        "secs": secs,
        "gbps": total as f64 * 8.0 / secs / 1e9,
    }))
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

/// The line [`hold`] prints once every connection is established end to end.
pub const HOLDING: &str = "\"holding\"";

/// Opens `conns` connections to an echo server, completes a 1-byte round trip on each (so
/// every proxy on the way holds an established flow), prints a `{"holding": N}` line and keeps
/// them open and silent for `hold` before closing them.
pub fn hold(to: SocketAddr, conns: usize, hold: Duration) -> Result<Value> {
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
