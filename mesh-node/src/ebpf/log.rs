//! Forwards the programs' aya-log records into the agent's `tracing` output.
//!
//! The logger must stay alive as long as the programs are loaded: dropping it closes the log
//! map the programs write to.

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;

#[derive(Debug)]
pub struct LogPump {
    task: tokio::task::JoinHandle<()>,
}

impl LogPump {
    /// Starts forwarding; logs and carries on if the object has no log map.
    pub fn start(ebpf: &mut Ebpf) -> Option<Self> {
        let logger = match EbpfLogger::init(ebpf) {
            Ok(logger) => logger,
            Err(e) => {
                tracing::warn!(error = %e, "eBPF log forwarding unavailable");
                return None;
            }
        };
        // SAFETY: the logger owns its ring buffer's descriptor for its whole life and always
        // reports that same descriptor; the AsyncFd owns the logger, so the descriptor outlives
        // the registration.
        let registered =
            unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "eBPF log forwarding unavailable");
                return None;
            }
        };
        let task = tokio::spawn(async move {
            loop {
                let Ok(mut guard) = fd.readable_mut().await else {
                    break;
                };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
        Some(Self { task })
    }
}

impl Drop for LogPump {
    fn drop(&mut self) {
        self.task.abort();
    }
}
