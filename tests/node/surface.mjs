// The unified surface through the openai npm package, unchanged: one scenario per run, one JSON
// document on stdout with what the SDK returned or raised, for tests/test_surface_node.py to check
// against what the fake provider received and sent.
//
//   node surface.mjs BASE_URL SCENARIO      (the API key comes in EGRESS_API_KEY)
//
// Every call goes through the SDK's public API; streams are accumulated by its own helper
// (chat.completions.stream -> finalChatCompletion), as an application would.
import OpenAI from 'openai';
import { VERSION } from 'openai/version';

const [baseURL, scenario] = process.argv.slice(2);
const apiKey = process.env.EGRESS_API_KEY;
if (!baseURL || !scenario || !apiKey) {
  process.stderr.write('usage: EGRESS_API_KEY=... node surface.mjs BASE_URL SCENARIO\n');
  process.exit(2);
}
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 20_000 });

const MODEL = 'claude-fake';
const MESSAGES = [
  { role: 'system', content: 'You are terse.' },
  { role: 'developer', content: 'Answer in English.' },
  { role: 'user', content: 'hi' },
];
const WEATHER = {
  type: 'function',
  function: {
    name: 'get_weather',
    description: 'Weather in a city',
    parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
  },
};
const TIME = {
  type: 'function',
  function: {
    name: 'get_time',
    parameters: { type: 'object', properties: { tz: { type: 'string' } }, required: ['tz'] },
  },
};
// The fake provider's TINY_PNG_BASE64: a 1x1 PNG whose bytes match its media type.
const PNG = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==';
const SCHEMA = { type: 'object', properties: { answer: { type: 'string' } }, required: ['answer'] };

function scenarioHeader(name) {
  return { headers: { 'x-fake-scenario': name } };
}

// What an application can read off an error the SDK raised.
function describeError(error) {
  return {
    class: error?.constructor?.name,
    isAPIError: error instanceof OpenAI.APIError,
    isRateLimitError: error instanceof OpenAI.RateLimitError,
    isConnectionError: error instanceof OpenAI.APIConnectionError,
    status: error?.status ?? null,
    code: error?.code ?? null,
    type: error?.type ?? null,
    message: String(error?.message ?? error),
    error: error?.error ?? null,
    retryAfter: error?.headers?.get?.('retry-after') ?? null,
  };
}

// Runs the stream helper to its end, recording every event an application could listen to.
async function accumulate(params, options) {
  const stream = client.chat.completions.stream(params, options);
  const seen = { chunks: [], content: [], toolArguments: [] };
  stream.on('chunk', (chunk) => seen.chunks.push(chunk));
  stream.on('content.delta', ({ delta }) => seen.content.push(delta));
  stream.on('tool_calls.function.arguments.done', ({ index, name, arguments: args, parsed_arguments }) =>
    seen.toolArguments.push({ index, name, arguments: args, parsed: parsed_arguments ?? null }),
  );
  try {
    seen.final = await stream.finalChatCompletion();
  } catch (error) {
    seen.error = describeError(error);
  }
  return seen;
}

async function createOrError(params, options) {
  try {
    return { completion: await client.chat.completions.create(params, options) };
  } catch (error) {
    return { error: describeError(error) };
  }
}

const SCENARIOS = {
  // A plain JSON completion, with a system and a developer message.
  async plain() {
    const { data, response } = await client.chat.completions.create({ model: MODEL, messages: MESSAGES }).withResponse();
    return { completion: data, contentType: response.headers.get('content-type') };
  },

  async stream() {
    return accumulate({ model: MODEL, messages: MESSAGES, stream: true, stream_options: { include_usage: true } });
  },

  // Two tool calls in one stream, then their results sent back as the SDK's own message shapes.
  async 'parallel-tools'() {
    const question = { role: 'user', content: 'weather and time?' };
    const streamed = await accumulate(
      { model: MODEL, messages: [question], tools: [WEATHER, TIME], stream: true },
      scenarioHeader('parallel-tools'),
    );
    if (streamed.error) return { streamed };
    const message = streamed.final.choices[0].message;
    const followup = [
      question,
      { role: 'assistant', content: message.content, tool_calls: message.tool_calls },
      ...message.tool_calls.map((call) => ({ role: 'tool', tool_call_id: call.id, content: `${call.function.name}: ok` })),
    ];
    const answer = await createOrError({ model: MODEL, messages: followup, tools: [WEATHER, TIME] });
    return { streamed, answer };
  },

  async image() {
    const content = [
      { type: 'text', text: 'what is this?' },
      { type: 'image_url', image_url: { url: `data:image/png;base64,${PNG}` } },
    ];
    return createOrError({ model: MODEL, messages: [{ role: 'user', content }] }, scenarioHeader('echo-images'));
  },

  async 'json-schema'() {
    return createOrError({
      model: MODEL,
      messages: [{ role: 'user', content: 'json please' }],
      response_format: { type: 'json_schema', json_schema: { name: 'answer', schema: SCHEMA } },
    });
  },

  async 'rate-limited'() {
    return createOrError({ model: MODEL, messages: MESSAGES }, scenarioHeader('rate-limited'));
  },

  async 'stream-error'() {
    return accumulate({ model: MODEL, messages: MESSAGES, stream: true }, scenarioHeader('stream-error'));
  },

  async 'stream-cut'() {
    return accumulate({ model: MODEL, messages: MESSAGES, stream: true }, scenarioHeader('stream-cut'));
  },
};

// The Responses API: the same SDK's client.responses, a Claude model translated statelessly.
const RESPONSE_TOOLS = [WEATHER, TIME].map(({ function: fn }) => ({ type: 'function', ...fn }));

async function respond(params, options) {
  try {
    return { response: await client.responses.create(params, options) };
  } catch (error) {
    return { error: describeError(error) };
  }
}

// Runs client.responses.stream to its end, recording the event types and text deltas.
async function accumulateResponse(params, options) {
  const seen = { types: [], deltas: [], sequence: [] };
  try {
    const stream = client.responses.stream(params, options);
    for await (const event of stream) {
      seen.types.push(event.type);
      seen.sequence.push(event.sequence_number);
      if (event.type === 'response.output_text.delta') seen.deltas.push(event.delta);
    }
    seen.final = await stream.finalResponse();
  } catch (error) {
    seen.error = describeError(error);
  }
  return seen;
}

Object.assign(SCENARIOS, {
  async 'responses-text'() {
    return respond({ model: MODEL, instructions: 'You are terse.', input: 'hi' });
  },

  async 'responses-stream'() {
    return accumulateResponse({ model: MODEL, input: 'hi', stream: true });
  },

  // Two function calls streamed, then the whole history sent back with their outputs.
  async 'responses-tools'() {
    const question = { role: 'user', content: 'weather and time?' };
    const streamed = await accumulateResponse(
      { model: MODEL, input: [question], tools: RESPONSE_TOOLS },
      scenarioHeader('parallel-tools'),
    );
    if (streamed.error) return { streamed };
    const calls = streamed.final.output.filter((item) => item.type === 'function_call');
    const history = [
      question,
      ...streamed.final.output,
      ...calls.map((call) => ({ type: 'function_call_output', call_id: call.call_id, output: `${call.name}: ok` })),
    ];
    const answer = await respond({ model: MODEL, input: history, tools: RESPONSE_TOOLS });
    return { streamed, answer };
  },

  async 'responses-stateful'() {
    return respond({ model: MODEL, input: 'hi', previous_response_id: 'resp_earlier' });
  },
});

const run = SCENARIOS[scenario];
if (run === undefined) {
  process.stderr.write(`unknown scenario ${scenario}; known: ${Object.keys(SCENARIOS).join(', ')}\n`);
  process.exit(2);
}
const observed = await run();
process.stdout.write(JSON.stringify({ scenario, sdkVersion: VERSION, ...observed }) + '\n');
