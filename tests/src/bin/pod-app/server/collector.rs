//! The `l7` server's OTLP trace collector: gRPC `TraceService/Export` requests are kept (up
//! to [`MAX_SPANS`] spans, the rest only counted), and `/_spans` lists them as JSON, so a test
//! can check what a proxy exported.

use std::sync::Arc;

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{KeyValue, any_value},
};
use parking_lot::Mutex;
use serde_json::{Map, Value, json};

/// Spans kept for `/_spans`.
const MAX_SPANS: usize = 10_000;
/// The gRPC path prefix of the service.
pub const PATH_PREFIX: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/";

#[derive(Debug, Default)]
struct Received {
    spans: Vec<Value>,
    /// Spans beyond [`MAX_SPANS`], counted only.
    overflow: u64,
    requests: u64,
}

/// Shared by the gRPC service and the `/_spans` handler.
#[derive(Clone, Debug, Default)]
pub struct Collector {
    received: Arc<Mutex<Received>>,
}

impl Collector {
    pub fn server(&self) -> TraceServiceServer<Self> {
        TraceServiceServer::new(self.clone())
    }

    fn received(&self) -> parking_lot::MutexGuard<'_, Received> {
        // A panic while holding the lock cannot leave the list inconsistent.
        self.received.lock()
    }

    /// `{"requests": N, "overflow": N, "spans": [...]}`.
    pub fn json(&self) -> Value {
        let received = self.received();
        json!({
            "requests": received.requests,
            "overflow": received.overflow,
            "spans": received.spans,
        })
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.received();
        received.requests += 1;
        for resource_spans in request.into_inner().resource_spans {
            let resource = attributes(
                resource_spans
                    .resource
                    .as_ref()
                    .map_or(&[][..], |r| &r.attributes),
            );
            for scope in resource_spans.scope_spans {
                let scope_name = scope.scope.map(|s| s.name).unwrap_or_default();
                for span in scope.spans {
                    if received.spans.len() >= MAX_SPANS {
                        received.overflow += 1;
                        continue;
                    }
                    let status = span.status.unwrap_or_default();
                    received.spans.push(json!({
                        "trace_id": hex(&span.trace_id),
                        "span_id": hex(&span.span_id),
                        "parent_span_id": hex(&span.parent_span_id),
                        "name": span.name,
                        "kind": span.kind,
                        "start_time_unix_nano": span.start_time_unix_nano,
                        "end_time_unix_nano": span.end_time_unix_nano,
                        "attributes": attributes(&span.attributes),
                        "status_code": status.code,
                        "status_message": status.message,
                        "resource": resource.clone(),
                        "scope": scope_name.clone(),
                    }));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// String, integer and boolean attributes as a JSON object; other kinds as their debug text.
fn attributes(list: &[KeyValue]) -> Value {
    let mut out = Map::new();
    for kv in list {
        let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(any_value::Value::StringValue(s)) => Value::String(s.clone()),
            Some(any_value::Value::IntValue(i)) => json!(i),
            Some(any_value::Value::BoolValue(b)) => json!(b),
            Some(other) => Value::String(format!("{other:?}")),
            None => Value::Null,
        };
        out.insert(kv.key.clone(), value);
    }
    Value::Object(out)
}
