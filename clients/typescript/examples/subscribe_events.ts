// Follows aimass events from Node.js: an ordered JetStream consumer on AIMASS_EVENTS,
// replayed from a point in time, each message an aimass.events.v1.Envelope decoded with
// the code buf.gen.yaml generates. See docs/events.md.
//
//   AIMASS_NATS_URL=nats://127.0.0.1:4232 AIMASS_TOPIC='aimass.registry.version.*' \
//   AIMASS_SINCE=2026-01-01T00:00:00Z node subscribe_events.js
//
// Prints one JSON line per event ({id, topic, subject, type}) until AIMASS_IDLE_MS pass
// without one (default 3000). tests/gateway/test_typescript_client.py runs it.
import { fromBinary } from "@bufbuild/protobuf";
import { DeliverPolicy, connect } from "nats";

import { EnvelopeSchema } from "../gen/aimass/events/v1/events_pb.js";

const env = process.env;

async function main(): Promise<void> {
  const nc = await connect({ servers: env.AIMASS_NATS_URL ?? "nats://127.0.0.1:4232" });
  try {
    const since = env.AIMASS_SINCE;
    const consumer = await nc.jetstream().consumers.get("AIMASS_EVENTS", {
      filterSubjects: env.AIMASS_TOPIC ?? "aimass.>",
      ...(since
        ? { deliver_policy: DeliverPolicy.StartTime, opt_start_time: since }
        : { deliver_policy: DeliverPolicy.New }),
    });
    const idle = Number(env.AIMASS_IDLE_MS ?? "3000");
    for (;;) {
      const batch = await consumer.fetch({ max_messages: 64, expires: idle });
      let count = 0;
      for await (const message of batch) {
        const envelope = fromBinary(EnvelopeSchema, message.data);
        const line = {
          id: envelope.id,
          topic: envelope.topic,
          subject: envelope.subject,
          type: envelope.type,
        };
        console.log(JSON.stringify(line));
        count += 1;
      }
      if (count === 0) return;
    }
  } finally {
    await nc.drain();
  }
}

await main();
