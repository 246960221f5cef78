// Review probes: the openai npm package against egress, one scenario per run, one JSON line out.
//   node review.mjs BASE_URL SCENARIO   (key in EGRESS_API_KEY)
import OpenAI from 'openai';
import { VERSION } from 'openai/version';

const [baseURL, scenario] = process.argv.slice(2);
const apiKey = process.env.EGRESS_API_KEY;
const retries = Number(process.env.MAX_RETRIES ?? '0');
const client = new OpenAI({ baseURL, apiKey, maxRetries: retries, timeout: 20_000 });
const MODEL = process.env.MODEL ?? 'claude-fake';

function describeError(error) {
  return {
    class: error?.constructor?.name,
    status: error?.status ?? null,
    code: error?.code ?? null,
    param: error?.param ?? null,
    type: error?.type ?? null,
    message: String(error?.message ?? error),
    error: error?.error ?? null,
    requestID: error?.requestID ?? null,
    headers: error?.headers ? Object.fromEntries(error.headers.entries()) : null,
  };
}

const long = {};
const ABORT_AFTER = Number(process.env.ABORT_AFTER ?? '2');

const SCENARIOS = {
  async 'request-id'() {
    const { data, response, request_id } = await client.chat.completions
      .create({ model: MODEL, messages: [{ role: 'user', content: 'hi' }] })
      .withResponse();
    return { requestID: request_id, dataRequestID: data._request_id, headers: Object.fromEntries(response.headers.entries()) };
  },
  async 'request-id-responses'() {
    const { data, response, request_id } = await client.responses
      .create({ model: MODEL, input: 'hi' })
      .withResponse();
    return { requestID: request_id, headers: Object.fromEntries(response.headers.entries()) };
  },
  async 'abort-chat'() {
    const controller = new AbortController();
    const stream = client.chat.completions.stream(
      { model: MODEL, messages: [{ role: 'user', content: 'hi' }], stream: true, stream_options: { include_usage: true } },
      { ...long, signal: controller.signal },
    );
    const content = [];
    stream.on('content.delta', ({ delta }) => {
      content.push(delta);
      if (content.length === ABORT_AFTER) controller.abort();
    });
    try {
      await stream.finalChatCompletion();
      return { content, finished: true };
    } catch (error) {
      return { content, error: describeError(error) };
    }
  },
  async 'abort-chat-break'() {
    const stream = await client.chat.completions.create(
      { model: MODEL, messages: [{ role: 'user', content: 'hi' }], stream: true, stream_options: { include_usage: true } },
      long,
    );
    const chunks = [];
    for await (const chunk of stream) {
      chunks.push(chunk);
      if (chunks.length === ABORT_AFTER + 1) break;
    }
    await new Promise((r) => setTimeout(r, 300));
    return { chunks: chunks.length };
  },
  async 'abort-responses'() {
    const controller = new AbortController();
    const stream = client.responses.stream({ model: MODEL, input: 'hi' }, { ...long, signal: controller.signal });
    const types = [];
    try {
      for await (const event of stream) {
        types.push(event.type);
        if (event.type === 'response.output_text.delta' && types.filter((t) => t === event.type).length === ABORT_AFTER)
          controller.abort();
      }
      return { types, finished: true };
    } catch (error) {
      return { types, error: describeError(error) };
    }
  },
  async 'rate-limited'() {
    try {
      await client.chat.completions.create(
        { model: MODEL, messages: [{ role: 'user', content: 'hi' }] },
        { headers: { 'x-fake-scenario': process.env.FAKE ?? 'rate-limited' } },
      );
      return { ok: true };
    } catch (error) {
      return { error: describeError(error) };
    }
  },
  async 'raw'() {
    // any call: body from env BODY, path from env PATH_
    try {
      const data = await client.post(process.env.PATH_, { body: JSON.parse(process.env.BODY) });
      return { data };
    } catch (error) {
      return { error: describeError(error) };
    }
  },
  async 'responses-raw'() {
    try {
      const data = await client.responses.create(JSON.parse(process.env.BODY));
      return { data };
    } catch (error) {
      return { error: describeError(error) };
    }
  },
  async 'chat-raw'() {
    try {
      const data = await client.chat.completions.create(JSON.parse(process.env.BODY));
      return { data };
    } catch (error) {
      return { error: describeError(error) };
    }
  },
};

const observed = await SCENARIOS[scenario]();
process.stdout.write(JSON.stringify({ scenario, sdkVersion: VERSION, ...observed }) + '\n');
