// Exports exactly COUNT spans with the Node OpenTelemetry SDK's OTLP/HTTP trace exporter, then shuts down.
//
//   node send_spans.js URL json|proto SERVICE COUNT [END_MS]
//
// URL is the full traces endpoint (http://HOST:PORT/v1/traces). Spans alternate between two operations
// ("GET /a" SERVER, "GET /b" CLIENT), each 5 ms long, ending from END_MS (unix ms; default now) on, 1 ms
// apart. Prints {"exported": n, "requests": r} on success; exits 1 when any export failed or fewer than
// COUNT spans were exported, 2 on bad arguments.
"use strict";

const { SpanKind } = require("@opentelemetry/api");
const { resourceFromAttributes } = require("@opentelemetry/resources");
const { BasicTracerProvider, BatchSpanProcessor } = require("@opentelemetry/sdk-trace-base");

const [url, protocol, service, countArg, endArg] = process.argv.slice(2);
const count = Number.parseInt(countArg, 10);
if (!url || !["json", "proto"].includes(protocol) || !service || !(count >= 0)) {
  console.error("usage: node send_spans.js URL json|proto SERVICE COUNT [END_MS]");
  process.exit(2);
}
const { OTLPTraceExporter } =
  protocol === "json"
    ? require("@opentelemetry/exporter-trace-otlp-http")
    : require("@opentelemetry/exporter-trace-otlp-proto");

// Counts what the exporter reports back, so a refused or failed export is an exit code, not a log line.
const inner = new OTLPTraceExporter({ url, timeoutMillis: 10000 });
const result = { exported: 0, requests: 0, failures: [] };
const exporter = {
  export(spans, done) {
    result.requests += 1;
    inner.export(spans, (res) => {
      if (res.code === 0) result.exported += spans.length;
      else result.failures.push(String(res.error && res.error.message ? res.error.message : res.error));
      done(res);
    });
  },
  shutdown: () => inner.shutdown(),
  forceFlush: () => inner.forceFlush(),
};

const provider = new BasicTracerProvider({
  resource: resourceFromAttributes({ "service.name": service, "service.instance.id": `${service}-1` }),
  spanProcessors: [
    new BatchSpanProcessor(exporter, { maxExportBatchSize: 128, maxQueueSize: Math.max(2048, count) }),
  ],
});
const tracer = provider.getTracer("telepipe-node-client");
const end0 = endArg ? Number(endArg) : Date.now();
for (let i = 0; i < count; i++) {
  const end = end0 + i;
  const [name, kind] = i % 2 === 0 ? ["GET /a", SpanKind.SERVER] : ["GET /b", SpanKind.CLIENT];
  tracer.startSpan(name, { kind, startTime: end - 5 }).end(end);
}

provider.shutdown().then(
  () => {
    console.log(JSON.stringify(result));
    process.exit(result.failures.length === 0 && result.exported === count ? 0 : 1);
  },
  (err) => {
    console.error(`shutdown failed: ${err}`);
    console.log(JSON.stringify(result));
    process.exit(1);
  },
);
