//! Per-connection and per-byte hot paths of the node proxy, in process.
//!
//! `cargo bench -p mesh-node --bench hot_paths`
//!
//! - `copy`: the bidirectional copy every proxied connection runs, moving 8 MiB each way
//!   through in-memory pipes (so the figure is the proxy's own cost, not the network's).
//! - `classify`: what each CONNECT costs before policy: parsing the `:authority` and the
//!   TLS server name into an identity.
//! - `certificate_lookup`: the certificate a handshake presents, found by identity among
//!   1,000 held (what every inbound handshake and outbound dial does).
//! - `hbone_stream_setup`: one CONNECT stream opened, answered 200 and upgraded on an
//!   established HTTP/2 connection with the HBONE settings, over an in-memory pipe (the
//!   per-connection cost of a pooled tunnel, TLS aside).

use std::{
    collections::HashSet,
    sync::{Arc, LazyLock},
    time::Duration,
};

use divan::{Bencher, black_box, counter::BytesCount};
use mesh_node::{
    hbone,
    identity::{
        CertStore, Identity,
        ca::LocalCa,
        store::{CertManager, Issuer},
    },
    proxy::copy,
};
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
                    copy::bidirectional(proxy_a, proxy_b, &mut counted, copy::Timeouts::NONE)
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

const HELD_CERTIFICATES: usize = 1_000;

/// A store holding [`HELD_CERTIFICATES`] workload certificates, issued by a local CA.
fn store_with_certificates(runtime: &tokio::runtime::Runtime) -> (Arc<CertStore>, Vec<Identity>) {
    let ca = LocalCa::generate("cluster.local").expect("CA");
    let store = Arc::new(
        CertStore::new(
            mesh_node::tls::provider(),
            std::slice::from_ref(ca.cert_der()),
            "cluster.local",
        )
        .expect("store"),
    );
    let identities: Vec<Identity> = (0..HELD_CERTIFICATES)
        .map(|i| Identity::new("cluster.local", "shop", &format!("sa-{i}")).expect("identity"))
        .collect();
    let wanted: HashSet<Identity> = identities.iter().cloned().collect();
    let mut manager = CertManager::new(store.clone(), Issuer::Local(ca), Duration::from_hours(24));
    let failed = runtime.block_on(manager.reconcile(&wanted));
    assert!(failed.is_empty(), "{failed:?}");
    (store, identities)
}

#[divan::bench]
fn certificate_lookup(bencher: Bencher<'_, '_>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let (store, identities) = store_with_certificates(&runtime);
    let mut next = 0usize;
    bencher.bench_local(|| {
        next = (next + 7) % identities.len();
        black_box(store.get(black_box(&identities[next])))
    });
}

#[divan::bench(sample_count = 20, sample_size = 50)]
fn hbone_stream_setup(bencher: Bencher<'_, '_>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (client, server) = tokio::io::duplex(1 << 20);
    // The destination side: answers every CONNECT with 200, as an agent does once the pod is
    // dialled, and holds the stream until the client drops it.
    runtime.spawn(async move {
        let Ok(mut server) = hbone::server::Server::handshake(server, 1024).await else {
            return;
        };
        while let hbone::server::Next::Stream(request, respond) = server.next().await {
            tokio::spawn(async move {
                if let Ok(mut stream) = hbone::server::accept(respond, request) {
                    let _ = std::future::poll_fn(|cx| stream.recv.poll_chunk(cx)).await;
                }
            });
        }
    });
    let sender = runtime.block_on(async {
        let (sender, driver) = hbone::client::handshake(client).await.expect("handshake");
        tokio::spawn(driver.run());
        sender
    });
    let dst: std::net::SocketAddr = "10.244.1.17:8080".parse().expect("address");
    let client: std::net::SocketAddr = "10.244.0.5:40000".parse().expect("address");
    bencher.bench_local(|| {
        runtime.block_on(async {
            black_box(
                hbone::client::connect(&sender, dst, client)
                    .await
                    .expect("CONNECT"),
            )
        })
    });
}
