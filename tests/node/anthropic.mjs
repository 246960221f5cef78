// The @anthropic-ai/sdk npm package through egress's passthrough (`/anthropic`), one scenario per
// run, one JSON line out.   node anthropic.mjs BASE_URL SCENARIO   (key in EGRESS_API_KEY)
import Anthropic from '@anthropic-ai/sdk';

const [baseURL, scenario] = process.argv.slice(2);
const client = new Anthropic({ baseURL, apiKey: process.env.EGRESS_API_KEY, maxRetries: 0, timeout: 20_000 });
const REQUEST = { model: 'claude-fake', max_tokens: 64, messages: [{ role: 'user', content: 'hi' }] };

const SCENARIOS = {
  async create() {
    const { data, request_id } = await client.messages.create(REQUEST).withResponse();
    return { message: data, requestID: request_id };
  },
  async 'stream-final'() {
    const stream = client.messages.stream(REQUEST);
    const deltas = [];
    stream.on('text', (text) => deltas.push(text));
    const message = await stream.finalMessage();
    return { message, deltas, requestID: stream.request_id };
  },
  async 'stream-error'() {
    try {
      await client.messages.stream(REQUEST).finalMessage();
      return { finished: true };
    } catch (error) {
      return { error: { class: error?.constructor?.name, status: error?.status ?? null, requestID: error?.requestID ?? null, message: String(error?.message ?? error) } };
    }
  },
  // A Message Batch's results, read as the SDK reads them: the batch retrieved, then its results_url
  // GET (relative through egress: joined to this client's base URL).
  async 'batch-results'() {
    const id = process.env.BATCH_ID;
    const batch = await client.messages.batches.retrieve(id);
    const results = [];
    for await (const result of await client.messages.batches.results(id)) results.push(result);
    return { resultsURL: batch.results_url, results };
  },
};

const run = SCENARIOS[scenario];
if (!run) throw new Error(`unknown scenario ${scenario}`);
process.stdout.write(JSON.stringify(await run()) + '\n');
