//! Per-connection and per-byte hot paths of the node proxy, in process.
//!
//! `cargo bench -p mesh-node --bench hot_paths`
//!
//! - `copy`: the bidirectional copy every proxied connection runs, moving 8 MiB each way
//!   through in-memory pipes (so the figure is the proxy's own cost, not the network's).
//! - `classify`: what each CONNECT costs before policy: parsing the `:authority` and the
//!   TLS server name into an identity.

use std::sync::LazyLock;

use divan::{Bencher, black_box, counter::BytesCount};
use mesh_node::{hbone, identity::Identity, proxy::copy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PAYLOAD: usize = 8 * 1024 * 1024;
/// Like a socket buffer: large enough not to be the bottleneck, small enough to exercise the
/// copy loop's buffer growth.
const PIPE: usize = 256 * 1024;

fn main() {
    divan::main();
}

#[divan::bench(sample_count = 20)]
fn copy_8mib_each_way(bencher: Bencher<'_, '_>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    bencher
        .counter(BytesCount::new(2 * PAYLOAD))
        .bench_local(|| {
            runtime.block_on(async {
                let (mut client, proxy_a) = tokio::io::duplex(PIPE);
                let (proxy_b, mut server) = tokio::io::duplex(PIPE);
                let proxy = async {
                    let mut counted = copy::Counted::default();
                    copy::bidirectional(proxy_a, proxy_b, &mut counted)
                        .await
                        .expect("copy");
                    counted
                };
                let ends = async {
                    let data = vec![0x5au8; PAYLOAD];
                    let mut got_server = Vec::with_capacity(PAYLOAD);
                    let mut got_client = Vec::with_capacity(PAYLOAD);
                    let (mut client_read, mut client_write) = tokio::io::split(&mut client);
                    let (mut server_read, mut server_write) = tokio::io::split(&mut server);
                    tokio::join!(
                        async {
                            client_write.write_all(&data).await.expect("write");
                            client_write.shutdown().await.expect("shutdown");
                        },
                        async {
                            server_write.write_all(&data).await.expect("write");
                            server_write.shutdown().await.expect("shutdown");
                        },
                        async {
                            server_read
                                .read_to_end(&mut got_server)
                                .await
                                .expect("read");
                        },
                        async {
                            client_read
                                .read_to_end(&mut got_client)
                                .await
                                .expect("read");
                        },
                    );
                    (got_server.len(), got_client.len())
                };
                let (counted, received) = tokio::join!(proxy, ends);
                assert_eq!(received, (PAYLOAD, PAYLOAD));
                black_box(counted);
            });
        });
}

#[divan::bench]
fn classify_authority() -> Result<std::net::SocketAddr, hbone::AuthorityError> {
    hbone::parse_authority(black_box(Some("10.244.1.17:8080")))
}

/// The SNI form of spiffe://cluster.local/ns/shop/sa/frontend, as a client sends it.
static SNI: LazyLock<String> = LazyLock::new(|| {
    Identity::new("cluster.local", "shop", "frontend")
        .expect("identity")
        .to_sni()
});

#[divan::bench]
fn classify_server_name() -> Option<Identity> {
    Identity::from_sni(black_box(SNI.as_str()), "cluster.local").ok()
}
