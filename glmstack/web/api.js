// The page's HTTP client: the platform API (/api/paas/v4) and the conversations API (/api/glmstack), with the
// caller's key, errors as ApiError, and the chat stream as parsed SSE chunks. Paths are relative, so the page
// also works behind a proxy that mounts glmstack under a prefix.

const KEY_STORAGE = 'glmstack.apiKey';
const V4 = 'api/paas/v4';
const OWN = 'api/glmstack';

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let key = localStorage.getItem(KEY_STORAGE) || '';

export function currentKey() {
  return key;
}

export function setKey(value) {
  key = value;
  if (value) localStorage.setItem(KEY_STORAGE, value);
  else localStorage.removeItem(KEY_STORAGE);
}

function headers(json) {
  const h = {};
  if (key) h.Authorization = `Bearer ${key}`;
  if (json) h['Content-Type'] = 'application/json';
  return h;
}

async function errorOf(response) {
  let code = String(response.status);
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) {
      code = String(body.error.code ?? code);
      message = body.error.message || message;
    } else if (body && body.detail) {
      message = typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail);
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, code, message);
}

async function request(method, path, body, { probeKey } = {}) {
  const init = { method, headers: headers(body !== undefined) };
  if (probeKey !== undefined) init.headers.Authorization = `Bearer ${probeKey}`;
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

export const models = () => request('GET', `${V4}/models`);
export const checkKey = (candidate) => request('GET', `${V4}/models`, undefined, { probeKey: candidate });
export const knowledgeBases = () => request('GET', `${V4}/knowledge?page=1&size=100`);

export function listConversations({ q = '', after = '', limit = 50 } = {}) {
  const params = new URLSearchParams({ limit: String(limit) });
  if (q) params.set('q', q);
  if (after) params.set('after', after);
  return request('GET', `${OWN}/conversations?${params}`);
}

export const createConversation = (fields) => request('POST', `${OWN}/conversations`, fields);
export const getConversation = (id) => request('GET', `${OWN}/conversations/${encodeURIComponent(id)}`);
export const updateConversation = (id, fields) =>
  request('PATCH', `${OWN}/conversations/${encodeURIComponent(id)}`, fields);
export const deleteConversation = (id) => request('DELETE', `${OWN}/conversations/${encodeURIComponent(id)}`);

export function appendMessages(id, messages, replaceFrom) {
  const body = { messages };
  if (replaceFrom !== undefined) body.replace_from = replaceFrom;
  return request('POST', `${OWN}/conversations/${encodeURIComponent(id)}/messages`, body);
}

// The export as a file download: fetched with the key (a plain link could not carry it), then saved.
export async function downloadExport(id, format) {
  const response = await fetch(`${OWN}/conversations/${encodeURIComponent(id)}/export?format=${format}`,
    { headers: headers(false) });
  if (!response.ok) throw await errorOf(response);
  const disposition = response.headers.get('Content-Disposition') || '';
  const match = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(disposition);
  const fallback = `conversation-${id}.${format === 'markdown' ? 'md' : 'json'}`;
  const name = match ? decodeURIComponent(match[1]) : fallback;
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement('a');
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

// POST a streamed chat and yield each `data:` chunk as an object until [DONE]. An error the server sends
// mid-stream arrives as a chunk with `error`; an HTTP error before the stream throws ApiError. Aborting
// `signal` closes the connection, which makes the server stop generating.
export async function* streamChat(body, signal) {
  const response = await fetch(`${V4}/chat/completions`, {
    method: 'POST', headers: headers(true), body: JSON.stringify({ ...body, stream: true }), signal,
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split('\n').filter((line) => line.startsWith('data:'))
        .map((line) => line.slice(5).trimStart()).join('\n');
      if (!data) continue;
      if (data === '[DONE]') return;
      yield JSON.parse(data);
    }
  }
}
