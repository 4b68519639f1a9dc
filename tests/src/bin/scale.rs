//! `scale`: the controller and the agents against a real API server holding a cluster's worth
//! of objects (`cargo xtask cluster scale`, as root). A benchmark, not a test: it reports.
//!
//! On a two-node testbed with the control plane in node 0's namespace (as the cluster tests
//! run it) and the mesh installed from the chart, it creates through the API, many requests at
//! once: a meshed namespace, `--pods` Pod objects bound to the nodes and reported Running and
//! Ready (their EndpointSlices made by the real controller-manager), `--services` Services
//! over them and `--policies` AuthorizationPolicies. It reports
//! - how long the creation took, and how long until node 0's agent held all of it (the
//!   controller's time to converge, through to an agent);
//! - the controller's and the agents' memory then;
//! - an agent's update latency: `--updates` times, one more policy, and the time until the
//!   agent's config dump lists it (each dump of the whole state takes part of that time).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures_util::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use mesh_tests::{
    cluster::{Cluster, ClusterOptions, Tools},
    mesh::{MESH_LABEL, Mesh, MeshOptions},
    testbed::Testbed,
};
use serde_json::{Value, json};

const NAMESPACE: &str = "scale";
/// Requests in flight at once.
const CONCURRENCY: usize = 32;
/// Bound on every wait.
const PATIENCE: Duration = Duration::from_mins(10);

#[derive(Parser)]
#[command(
    name = "scale",
    about = "Trellis's controller and agents against many API objects"
)]
struct Cli {
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    #[arg(long, default_value_t = 200)]
    services: usize,
    #[arg(long, default_value_t = 500)]
    policies: usize,
    /// Policies added one at a time to time an agent's update.
    #[arg(long, default_value_t = 10)]
    updates: usize,
    /// Where to write the figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let tools = Tools::find()?;
    let tb = Testbed::builder().nodes(2).pods_per_node(1).build()?;
    let cluster = Cluster::start(
        tools,
        ClusterOptions {
            netns: Some(tb.node(0).netns.name().to_owned()),
            dir: Some(tb.scratch_dir().join("cluster")),
            ..ClusterOptions::default()
        },
    )?;
    let mesh = Mesh::start_kubernetes(&tb, &cluster, &MeshOptions::default())?;
    let nodes: Vec<String> = tb.nodes().iter().map(|n| n.name.clone()).collect();
    let kubeconfig = cluster.kubeconfig();
    let api = |work: Work| -> Result<Duration> {
        let (kubeconfig, nodes) = (kubeconfig.clone(), nodes.clone());
        // The API server listens on node 0's loopback: the client runs there.
        tb.node(0).netns.run(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(work.run(&kubeconfig, &nodes))
        })?
    };

    let start = Instant::now();
    let created = api(Work::Create {
        pods: cli.pods,
        services: cli.services,
        policies: cli.policies,
    })?;
    eprintln!("scale: created in {:.1}s", created.as_secs_f64());
    let counts = |dump: &Value| -> (usize, usize, usize) {
        let of_ns = |key: &str| {
            dump[key].as_array().map_or(0, |a| {
                a.iter().filter(|o| o["namespace"] == NAMESPACE).count()
            })
        };
        let policies = dump["policies"].as_array().map_or(0, Vec::len);
        (of_ns("workloads"), of_ns("services"), policies)
    };
    let wanted = (cli.pods, cli.services, cli.policies);
    let mut last = (0, 0, 0);
    while last != wanted {
        if start.elapsed() > PATIENCE {
            bail!("node 0's agent holds {last:?} of {wanted:?} after {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
        last = counts(&mesh.config_dump(0)?);
    }
    let converged = start.elapsed();
    eprintln!(
        "scale: node 0's agent holds everything after {:.1}s",
        converged.as_secs_f64()
    );

    let rss = |pid: Option<u32>, field: &str| -> Result<u64> {
        let pid = pid.context("process not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .with_context(|| format!("no {field} for {pid}"))
    };
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);

    let mut latencies = Vec::new();
    for i in 0..cli.updates {
        let before = counts(&mesh.config_dump(0)?).2;
        let begun = Instant::now();
        api(Work::OnePolicy(i))?;
        while counts(&mesh.config_dump(0)?).2 <= before {
            if begun.elapsed() > PATIENCE {
                bail!("update {i} did not reach node 0's agent in {PATIENCE:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        latencies.push(begun.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    let median = latencies
        .get(latencies.len() / 2)
        .copied()
        .unwrap_or_default();
    let max = latencies.last().copied().unwrap_or_default();

    let report = json!({
        "pods": cli.pods,
        "services": cli.services,
        "policies": cli.policies,
        "create_secs": created.as_secs_f64(),
        "converge_secs": converged.as_secs_f64(),
        "controller_rss_mib": mib(rss(mesh.controller_pid(), "VmRSS:")?),
        "controller_anon_mib": mib(rss(mesh.controller_pid(), "RssAnon:")?),
        "agent_rss_mib": mib(rss(mesh.agent_pid(0), "VmRSS:")?),
        "agent_anon_mib": mib(rss(mesh.agent_pid(0), "RssAnon:")?),
        "update_latency_ms": {"median": median, "max": max, "samples": latencies},
    });
    println!(
        "objects                 {} pods, {} Services, {} policies\n\
         created through the API {:.1} s\n\
         agent holds them all    {:.1} s after the first request\n\
         controller memory       {:.1} MiB RSS ({:.1} MiB anonymous)\n\
         agent memory            {:.1} MiB RSS ({:.1} MiB anonymous)\n\
         agent update latency    median {median:.0} ms, max {max:.0} ms over {} policies",
        cli.pods,
        cli.services,
        cli.policies,
        created.as_secs_f64(),
        converged.as_secs_f64(),
        report["controller_rss_mib"].as_f64().unwrap_or_default(),
        report["controller_anon_mib"].as_f64().unwrap_or_default(),
        report["agent_rss_mib"].as_f64().unwrap_or_default(),
        report["agent_anon_mib"].as_f64().unwrap_or_default(),
        cli.updates,
    );
    if let Some(path) = cli.json {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// What one visit to the API server does.
enum Work {
    Create {
        pods: usize,
        services: usize,
        policies: usize,
    },
    /// One more policy (`probe-<n>`).
    OnePolicy(usize),
}

impl Work {
    async fn run(self, kubeconfig: &std::path::Path, nodes: &[String]) -> Result<Duration> {
        let config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(kubeconfig)?,
            &KubeConfigOptions::default(),
        )
        .await?;
        let client = Client::try_from(config)?;
        let begun = Instant::now();
        match self {
            Work::Create {
                pods,
                services,
                policies,
            } => create(&client, nodes, pods, services, policies).await?,
            Work::OnePolicy(n) => {
                policy_api(&client)
                    .create(&PostParams::default(), &policy(&format!("probe-{n}"), n, n))
                    .await?;
            }
        }
        Ok(begun.elapsed())
    }
}

fn policy_api(client: &Client) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "security.trellis.dev",
        "v1",
        "AuthorizationPolicy",
    ));
    Api::namespaced_with(client.clone(), NAMESPACE, &resource)
}

fn policy(name: &str, n: usize, app: usize) -> DynamicObject {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "security.trellis.dev",
        "v1",
        "AuthorizationPolicy",
    ));
    let mut object = DynamicObject::new(name, &resource).within(NAMESPACE);
    object.data = json!({"spec": {
        "selector": {"matchLabels": {"app": format!("app-{app}")}},
        "action": "ALLOW",
        "rules": [{"from": [{"source": {"namespaces": [format!("caller-{n}")]}}]}],
    }});
    object
}

async fn create(
    client: &Client,
    nodes: &[String],
    pods: usize,
    services: usize,
    policies: usize,
) -> Result<()> {
    let params = PostParams::default();
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &params,
            &serde_json::from_value(
                json!({"metadata": {"name": NAMESPACE, "labels": {MESH_LABEL: "enabled"}}}),
            )?,
        )
        .await?;
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), NAMESPACE);
    accounts
        .create(
            &params,
            &serde_json::from_value(json!({"metadata": {"name": "app"}}))?,
        )
        .await?;
    let apps = services.max(1);

    let pod_api: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    stream::iter(0..pods)
        .map(|i| {
            let (pod_api, params) = (pod_api.clone(), params.clone());
            let node = nodes[i % nodes.len()].clone();
            async move {
                let name = format!("pod-{i}");
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": {"app": format!("app-{}", i % apps)}},
                    "spec": {
                        "nodeName": node,
                        "serviceAccountName": "app",
                        "automountServiceAccountToken": false,
                        "containers": [{"name": "app", "image": "app"}],
                    },
                }))?;
                pod_api.create(&params, &pod).await?;
                let ip = format!("10.251.{}.{}", i / 250, i % 250 + 1);
                let status = json!({"status": {
                    "phase": "Running",
                    "podIP": ip,
                    "podIPs": [{"ip": ip}],
                    "conditions": [{"type": "Ready", "status": "True"}],
                }});
                pod_api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .context("creating the pods")?;

    let service_api: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    stream::iter(0..services)
        .map(|j| {
            let (api, params) = (service_api.clone(), params.clone());
            async move {
                let service: Service = serde_json::from_value(json!({
                    "metadata": {"name": format!("svc-{j}")},
                    "spec": {"selector": {"app": format!("app-{j}")},
                             "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
                }))?;
                api.create(&params, &service).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .context("creating the Services")?;

    let policies_api = policy_api(client);
    stream::iter(0..policies)
        .map(|k| {
            let (api, params) = (policies_api.clone(), params.clone());
            async move {
                api.create(&params, &policy(&format!("p-{k}"), k, k % apps))
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .context("creating the policies")?;
    Ok(())
}
