// A Node.js client of a running aimass stack over gRPC, with an API key, through the
// code buf.gen.yaml generates (protobuf-es) and Connect's gRPC transport.
//
//   AIMASS_API_KEY=... AIMASS_DATA_ADDRESS=127.0.0.1:7101 AIMASS_REGISTRY_ADDRESS=127.0.0.1:7105 \
//   AIMASS_EXPECT_DATASET=datasets/x AIMASS_EXPECT_VERSION=models/m/versions/1 \
//   AIMASS_ROUTING_ADDRESS=127.0.0.1:7106 AIMASS_PREDICT_DEPLOYMENT=deployments/d \
//   AIMASS_PREDICT_INPUT='[[0.5, ...]]' AIMASS_PREDICT_OUT=/tmp/node-predict.json \
//   (compiled with tsc next to the generated code, then) node --test stack.test.js
//
// Run by tests/gateway/test_typescript_client.py against a stack it starts: it generates
// the code with buf, compiles both with tsc (strict) and runs this file with Node 20.
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { test } from "node:test";

import type { DescService } from "@bufbuild/protobuf";
import { Code, ConnectError, type Client, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { AccessService, Role } from "../gen/aimass/access/v1/access_pb.js";
import { DataService } from "../gen/aimass/data/v1/data_pb.js";
import { RegistryService } from "../gen/aimass/registry/v1/registry_pb.js";
import { PredictionService } from "../gen/aimass/routing/v1/routing_pb.js";

const env = process.env;

function client<T extends DescService>(
  service: T,
  address: string | undefined,
  key: string | undefined = env.AIMASS_API_KEY,
): Client<T> {
  const withKey: Interceptor = (next) => async (request) => {
    if (key) request.header.set("x-api-key", key);
    return next(request);
  };
  const transport = createGrpcTransport({
    baseUrl: `http://${address}`,
    interceptors: [withKey],
  });
  return createClient(service, transport);
}

test("lists datasets with an API key", async () => {
  const reply = await client(DataService, env.AIMASS_DATA_ADDRESS).listDatasets({});
  const names = reply.datasets.map((d) => d.name);
  assert.ok(names.includes(env.AIMASS_EXPECT_DATASET ?? ""), `got ${names.join(", ")}`);
});

test("reads a model version", async () => {
  const registry = client(RegistryService, env.AIMASS_REGISTRY_ADDRESS);
  const version = await registry.getModelVersion({ name: env.AIMASS_EXPECT_VERSION ?? "" });
  assert.equal(version.name, env.AIMASS_EXPECT_VERSION);
  assert.equal(version.artifacts[0].sha256, env.AIMASS_EXPECT_SHA256);
});

test("knows who it is", async () => {
  const access = client(AccessService, env.AIMASS_REGISTRY_ADDRESS);
  const identity = await access.lookupCallerIdentity({});
  assert.equal(identity.role, Role.ADMIN);
});

test("is refused without a key", async () => {
  const anonymous = client(DataService, env.AIMASS_DATA_ADDRESS, "");
  await assert.rejects(anonymous.listDatasets({}), (err: unknown) => {
    assert.ok(err instanceof ConnectError);
    assert.equal(err.code, Code.Unauthenticated);
    return true;
  });
});

// Float32 row-major batch in, the first output decoded from its raw little-endian bytes
// and written as JSON for the Python test to compare with the Python SDK's answer.
test("runs a Predict against a deployment", async () => {
  const rows: number[][] = JSON.parse(env.AIMASS_PREDICT_INPUT ?? "[]");
  assert.ok(rows.length > 0, "AIMASS_PREDICT_INPUT holds no rows");
  const batch = Float32Array.from(rows.flat());
  const prediction = client(PredictionService, env.AIMASS_ROUTING_ADDRESS);
  const reply = await prediction.predict({
    deployment: env.AIMASS_PREDICT_DEPLOYMENT ?? "",
    inputs: [
      { name: "input", datatype: "FP32", shape: [BigInt(rows.length), BigInt(rows[0].length)] },
    ],
    rawInputContents: [new Uint8Array(batch.buffer)],
  });
  const output = reply.outputs[0];
  assert.equal(output.datatype, "FP32");
  const raw = reply.rawOutputContents[0];
  // Copied: the raw bytes may start at an offset a Float32Array cannot view.
  const values = new Float32Array(raw.slice().buffer);
  writeFileSync(
    env.AIMASS_PREDICT_OUT ?? "node-predict.json",
    JSON.stringify({
      modelVersion: reply.modelVersion,
      name: output.name,
      shape: output.shape.map(Number),
      values: Array.from(values),
    }),
  );
});
