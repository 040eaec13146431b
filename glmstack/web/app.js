// The chat page: one conversation at a time, streamed from /chat/completions and stored server-side through
// the conversations API (the page is their client: it saves the user's message when sent and the reply when
// the stream ends or is stopped). The open conversation's id is in the URL (#c=<id>), so a reload resumes it.

import * as api from './api.js';
import { copyText, el, messageView } from './render.js';
import { createSidebar } from './sidebar.js';

const SETTINGS_STORAGE = 'glmstack.settings';
const $ = (id) => document.getElementById(id);

const ui = {
  messages: $('messages'), prompt: $('prompt'), send: $('send'), stop: $('stop'), composer: $('composer'),
  title: $('conversation-title'), model: $('model'), knowledge: $('knowledge'), knowledgeField: $('knowledge-field'),
  system: $('system-prompt'), temperature: $('temperature'), topP: $('top-p'), maxTokens: $('max-tokens'),
  temperatureValue: $('temperature-value'), topPValue: $('top-p-value'), settings: $('settings'),
  errorBanner: $('error-banner'), sidebar: $('sidebar'), scrim: $('scrim'), toggleSidebar: $('toggle-sidebar'),
  toggleSettings: $('toggle-settings'), exportMenu: $('export-menu'), keyDialog: $('key-dialog'),
  keyForm: $('key-form'), keyInput: $('key-input'), keyError: $('key-error'), authStatus: $('auth-status'),
  changeKey: $('change-key'),
};

const state = {
  defaults: {},       // the served model's generation_defaults
  conversation: null, // the open conversation (without messages); null: a new chat, created on first send
  messages: [],       // its messages as stored: {position, role, content, reasoning_content, tool_calls, meta}
  controller: null,   // the AbortController of the stream in flight
  ready: false,
};

// For benchmarks/bench_web_page.py: when Send was clicked and when the first streamed character reached the DOM.
window.glmstackTiming = { send: null, firstChar: null };

const sidebar = createSidebar({
  open: (id) => { closeSidebar(); openConversation(id); },
  onDeleted: (id) => { if (state.conversation?.id === id) newChat(); },
  onRenamed: (conversation) => {
    if (state.conversation?.id === conversation.id) {
      state.conversation.title = conversation.title;
      ui.title.textContent = conversation.title;
    }
  },
  onError: handleError,
  currentId: () => state.conversation?.id,
});

// ---- errors and the key -------------------------------------------------------------------------------------

function showError(message) {
  ui.errorBanner.textContent = message;
  ui.errorBanner.hidden = false;
}

function hideError() {
  ui.errorBanner.hidden = true;
}

function handleError(error) {
  if (error instanceof api.ApiError && error.status === 401) {
    askForKey(api.currentKey() ? `The key was refused: ${error.message}` : '');
    return;
  }
  showError(error.message || String(error));
}

function askForKey(message = '') {
  state.ready = false;
  ui.send.disabled = true;
  ui.keyError.textContent = message;
  ui.keyError.hidden = !message;
  ui.keyInput.value = '';
  if (!ui.keyDialog.open) ui.keyDialog.showModal();
  ui.keyInput.focus();
}

ui.keyDialog.addEventListener('cancel', (event) => event.preventDefault()); // the page is useless without one

ui.keyForm.addEventListener('submit', async (event) => {
  event.preventDefault();
  const candidate = ui.keyInput.value.trim();
  if (!candidate) return;
  try {
    const models = await api.checkKey(candidate);
    api.setKey(candidate);
    ui.keyDialog.close();
    await start(models);
  } catch (error) {
    const refused = error instanceof api.ApiError && error.status === 401;
    ui.keyError.textContent = refused ? `That key was refused: ${error.message}` : error.message;
    ui.keyError.hidden = false;
  }
});

ui.changeKey.addEventListener('click', () => {
  abortStream();
  api.setKey('');
  state.conversation = null;
  state.messages = [];
  renderMessages();
  sidebar.clear();
  askForKey();
});

// ---- settings -----------------------------------------------------------------------------------------------

function number(input) {
  return input.value === '' ? undefined : Number(input.value);
}

function readSettings() {
  return {
    model: ui.model.value || undefined,
    temperature: number(ui.temperature),
    top_p: number(ui.topP),
    max_tokens: number(ui.maxTokens),
    knowledge_id: ui.knowledge.value || undefined,
  };
}

function showSettingValues() {
  ui.temperatureValue.textContent = ui.temperature.value;
  ui.topPValue.textContent = ui.topP.value;
}

function applySettings(settings = {}, systemPrompt = '') {
  const d = state.defaults;
  if (settings.model) ensureOption(ui.model, settings.model);
  ui.model.value = settings.model || ui.model.options[0]?.value || '';
  ui.temperature.value = String(settings.temperature ?? d.temperature ?? 0.95);
  ui.topP.value = String(settings.top_p ?? d.top_p ?? 0.7);
  ui.maxTokens.value = settings.max_tokens ?? d.max_tokens ?? '';
  if (settings.knowledge_id) ensureOption(ui.knowledge, settings.knowledge_id);
  ui.knowledge.value = settings.knowledge_id || '';
  ui.system.value = systemPrompt || '';
  showSettingValues();
}

function ensureOption(select, value) {
  if (![...select.options].some((o) => o.value === value)) select.append(el('option', { value, text: value }));
}

let saveSettingsTimer = null;
function settingsChanged() {
  showSettingValues();
  const settings = readSettings();
  localStorage.setItem(SETTINGS_STORAGE, JSON.stringify({ ...settings, system_prompt: ui.system.value }));
  const conversation = state.conversation;
  if (!conversation) return;
  clearTimeout(saveSettingsTimer);
  saveSettingsTimer = setTimeout(() => {
    api.updateConversation(conversation.id, { model: settings.model, system_prompt: ui.system.value, settings })
      .catch(handleError);
  }, 400);
}

for (const input of [ui.model, ui.knowledge, ui.system, ui.temperature, ui.topP, ui.maxTokens]) {
  input.addEventListener(input.tagName === 'SELECT' ? 'change' : 'input', settingsChanged);
}

$('reset-settings').addEventListener('click', () => {
  const { model, knowledge_id: knowledgeId } = readSettings();
  applySettings({ model, knowledge_id: knowledgeId }, ui.system.value);
  settingsChanged();
});

function savedSettings() {
  try {
    return JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || '{}');
  } catch {
    return {};
  }
}

// ---- messages -----------------------------------------------------------------------------------------------

function emptyState() {
  return el('div', { class: 'empty-state' },
    el('h2', { text: 'How can I help?' }),
    el('p', { class: 'muted', text: `Chatting with ${ui.model.value || 'the served model'} on this machine.` }));
}

function renderMessages() {
  const lastAssistant = state.messages.findLastIndex((m) => m.role === 'assistant');
  const views = state.messages
    .filter((m) => m.role !== 'system')
    .map((m) => messageView(m, { last: state.messages.indexOf(m) === lastAssistant && !state.controller }).article);
  ui.messages.replaceChildren(...(views.length ? views : [emptyState()]));
  scrollToEnd(true);
}

function scrollToEnd(force) {
  const m = ui.messages;
  if (force || m.scrollHeight - m.scrollTop - m.clientHeight < 120) m.scrollTop = m.scrollHeight;
}

ui.messages.addEventListener('click', (event) => {
  const button = event.target.closest('button');
  if (!button) return;
  if (button.classList.contains('copy-code')) {
    copyText(button.closest('.code-block').querySelector('code').textContent, button);
  } else if (button.classList.contains('copy-message')) {
    const article = button.closest('article');
    const message = state.messages.find((m) => String(m.position) === article.dataset.position);
    copyText(message?.content ?? article.querySelector('.content, .bubble')?.textContent ?? '', button);
  } else if (button.classList.contains('regenerate')) {
    regenerate();
  }
});

// ---- conversations ------------------------------------------------------------------------------------------

function titleOf(text) {
  const flat = text.replace(/\s+/g, ' ').trim();
  if (flat.length <= 60) return flat;
  const cut = flat.slice(0, 60);
  return `${cut.slice(0, cut.lastIndexOf(' ') > 30 ? cut.lastIndexOf(' ') : 60)}\u2026`;
}

function applyConversationSettings(conversation) {
  const fallback = savedSettings();
  if (conversation) {
    // a conversation made elsewhere (the API) may carry no settings: the ones last used fill the gaps
    applySettings({ ...fallback, ...conversation.settings,
      model: conversation.model || conversation.settings?.model || fallback.model }, conversation.system_prompt);
  } else {
    applySettings(fallback, fallback.system_prompt);
  }
}

function showConversation(conversation) {
  state.conversation = conversation;
  state.messages = conversation?.messages || [];
  ui.title.textContent = conversation?.title || 'New chat';
  document.title = conversation?.title ? `${conversation.title} - glmstack` : 'glmstack chat';
  applyConversationSettings(conversation);
  const hash = conversation ? `#c=${encodeURIComponent(conversation.id)}` : '';
  if (location.hash !== hash) history.replaceState(null, '', hash || location.pathname);
  renderMessages();
  sidebar.markCurrent();
}

async function openConversation(id) {
  abortStream();
  hideError();
  try {
    showConversation(await api.getConversation(id));
  } catch (error) {
    if (error instanceof api.ApiError && error.status === 404) {
      showConversation(null);
      showError('That conversation no longer exists.');
    } else {
      handleError(error);
    }
  }
}

function newChat() {
  abortStream();
  hideError();
  showConversation(null);
  ui.prompt.focus();
}

$('new-chat').addEventListener('click', () => { closeSidebar(); newChat(); });

async function exportAs(format) {
  ui.exportMenu.open = false;
  if (!state.conversation) {
    showError('Nothing to export yet: send a message first.');
    return;
  }
  try {
    await api.downloadExport(state.conversation.id, format);
  } catch (error) {
    handleError(error);
  }
}

$('export-json').addEventListener('click', () => exportAs('json'));
$('export-markdown').addEventListener('click', () => exportAs('markdown'));

// ---- chatting -----------------------------------------------------------------------------------------------

function setStreaming(on) {
  ui.send.hidden = on;
  ui.stop.hidden = !on;
  ui.composer.classList.toggle('busy', on);
}

function abortStream() {
  state.controller?.abort();
}

ui.stop.addEventListener('click', abortStream);

function mergeToolCalls(calls, pieces) {
  for (const piece of pieces) {
    const index = piece.index ?? calls.length;
    const call = calls[index] || (calls[index] = { id: piece.id, type: piece.type || 'function', function: {} });
    if (piece.id) call.id = piece.id;
    if (piece.type) call.type = piece.type;
    const fn = piece.function || {};
    if (fn.name) call.function.name = (call.function.name || '') + fn.name;
    if (fn.arguments) call.function.arguments = (call.function.arguments || '') + fn.arguments;
    for (const [name, value] of Object.entries(piece)) {
      if (!['index', 'id', 'type', 'function'].includes(name)) call[name] = value;
    }
  }
}

function chatBody(history, settings) {
  const messages = [];
  if (ui.system.value.trim()) messages.push({ role: 'system', content: ui.system.value });
  for (const m of history) {
    if (m.role === 'user' || (m.role === 'assistant' && m.content)) messages.push({ role: m.role, content: m.content });
  }
  const body = { model: settings.model, messages };
  for (const name of ['temperature', 'top_p', 'max_tokens']) {
    if (settings[name] !== undefined && !Number.isNaN(settings[name])) body[name] = settings[name];
  }
  if (settings.knowledge_id) body.tools = [{ type: 'retrieval', retrieval: { knowledge_id: settings.knowledge_id } }];
  return body;
}

// Streams a reply to `history` into a new message view; when the stream ends (or is stopped) the reply is
// stored after `saved` (the user's message being stored) - replacing positions >= replaceFrom when given.
// `started` is called once the first chunk is on the page (or the stream is over).
async function generate(history, saved, replaceFrom, started = () => {}) {
  const settings = readSettings();
  const reply = { role: 'assistant', content: '', reasoning_content: '', tool_calls: [], meta: { model: settings.model } };
  const view = messageView(reply, { streaming: true });
  ui.messages.querySelector('.empty-state')?.remove();
  ui.messages.append(view.article);
  scrollToEnd(true);
  const controller = new AbortController();
  state.controller = controller;
  setStreaming(true);

  let pending = false;
  const paint = () => {
    pending = false;
    view.update({ ...reply, streaming: true });
    scrollToEnd(false);
  };
  let finishReason = null;
  let error = null;
  try {
    for await (const chunk of api.streamChat(chatBody(history, settings), controller.signal)) {
      if (chunk.error) {
        error = chunk.error.message || `error ${chunk.error.code}`;
        break;
      }
      if (chunk.usage) reply.meta.usage = chunk.usage;
      if (chunk.model) reply.meta.model = chunk.model;
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      const first = !reply.content && delta.content;
      if (delta.content) reply.content += delta.content;
      if (delta.reasoning_content) reply.reasoning_content += delta.reasoning_content;
      if (delta.tool_calls) mergeToolCalls(reply.tool_calls, delta.tool_calls);
      if (choice.finish_reason) finishReason = choice.finish_reason;
      if (first) { // the first character goes in at once (and is timed); the rest once per frame
        paint();
        window.glmstackTiming.firstChar = performance.now();
      } else if (!pending) {
        pending = true;
        requestAnimationFrame(paint);
      }
      started();
    }
  } catch (e) {
    if (e.name === 'AbortError') finishReason = 'abort';
    else if (e instanceof api.ApiError && e.status === 401) { state.controller = null; setStreaming(false); handleError(e); }
    else error = e.message || String(e);
  }
  started();
  if (state.controller === controller) state.controller = null;
  setStreaming(false);
  reply.meta.finish_reason = finishReason || (error ? 'error' : 'abort');
  if (error) reply.meta.error = error;
  view.update({ ...reply, error });

  const hasReply = reply.content || reply.reasoning_content || reply.tool_calls.length;
  if (!hasReply) {
    view.article.remove();
    if (error) showError(error);
  }
  try {
    const conversation = await saved; // the conversation the user's message went into
    if (!hasReply) return;
    const stored = await api.appendMessages(conversation.id, [{
      role: 'assistant', content: reply.content, reasoning_content: reply.reasoning_content || null,
      tool_calls: reply.tool_calls.length ? reply.tool_calls : null, meta: reply.meta,
    }], replaceFrom);
    if (state.conversation?.id === conversation.id && !state.controller) {
      state.messages = stored.messages;
      renderMessages();
    }
  } catch (e) {
    handleError(e);
  } finally {
    sidebar.refresh();
  }
}

async function send(text) {
  if (state.controller || !state.ready) return;
  hideError();
  const settings = readSettings();
  const local = { role: 'user', content: text, position: state.messages.length };
  const turns = [...state.messages, local];
  const existing = state.conversation;
  // The message is stored once the reply has started (or failed): those writes would otherwise compete with
  // the chat request and delay the first character.
  let begin;
  const saved = new Promise((resolve) => { begin = resolve; }).then(async () => {
    let conversation = existing;
    if (!conversation) {
      conversation = await api.createConversation({ title: titleOf(text), model: settings.model,
        system_prompt: ui.system.value, settings });
      if (!state.conversation && state.messages === turns) { // still on this new chat: it is now stored
        state.conversation = conversation;
        ui.title.textContent = conversation.title;
        history.replaceState(null, '', `#c=${encodeURIComponent(conversation.id)}`);
      }
    }
    const stored = await api.appendMessages(conversation.id, [{ role: 'user', content: text }]);
    local.position = stored.messages[stored.messages.length - 1].position;
    sidebar.refresh();
    return stored;
  });
  saved.catch(abortStream); // generate() reports the error
  state.messages = turns;
  ui.messages.querySelector('.empty-state')?.remove();
  ui.messages.append(messageView(local).article);
  ui.prompt.value = '';
  autosize();
  await generate(turns, saved, undefined, begin);
}

function regenerate() {
  if (state.controller || !state.conversation) return;
  const index = state.messages.findLastIndex((m) => m.role === 'assistant');
  if (index < 0) return;
  const replaceFrom = state.messages[index].position;
  state.messages = state.messages.slice(0, index);
  renderMessages();
  hideError();
  generate(state.messages, Promise.resolve(state.conversation), replaceFrom);
}

ui.composer.addEventListener('submit', (event) => {
  event.preventDefault();
  window.glmstackTiming = { send: performance.now(), firstChar: null };
  const text = ui.prompt.value.trim();
  if (text) send(text);
});

ui.prompt.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});

function autosize() {
  ui.prompt.style.height = 'auto';
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 240)}px`;
}
ui.prompt.addEventListener('input', autosize);

// ---- layout -------------------------------------------------------------------------------------------------

function closeSidebar() {
  ui.sidebar.classList.remove('open');
  ui.scrim.hidden = true;
  ui.toggleSidebar.setAttribute('aria-expanded', 'false');
}

ui.toggleSidebar.addEventListener('click', () => {
  const open = !ui.sidebar.classList.contains('open');
  ui.sidebar.classList.toggle('open', open);
  ui.scrim.hidden = !open;
  ui.toggleSidebar.setAttribute('aria-expanded', String(open));
});
ui.scrim.addEventListener('click', closeSidebar);

ui.toggleSettings.addEventListener('click', () => {
  ui.settings.hidden = !ui.settings.hidden;
  ui.toggleSettings.setAttribute('aria-expanded', String(!ui.settings.hidden));
});

window.addEventListener('hashchange', () => {
  const id = new URLSearchParams(location.hash.slice(1)).get('c');
  if (id && id !== state.conversation?.id) openConversation(id);
});

// ---- start --------------------------------------------------------------------------------------------------

async function loadKnowledgeBases() {
  try {
    const page = await api.knowledgeBases();
    const bases = page.list || page.data || [];
    const chosen = ui.knowledge.value;
    ui.knowledge.replaceChildren(el('option', { value: '', text: 'None' }),
      ...bases.map((b) => el('option', { value: b.id, text: b.name || b.id })));
    ui.knowledge.value = chosen;
    ui.knowledgeField.hidden = bases.length === 0;
  } catch {
    ui.knowledgeField.hidden = true; // the picker is optional: the chat works without it
  }
}

async function start(models) {
  const cards = models.data || [];
  ui.model.replaceChildren(...cards.map((card) => el('option', { value: card.id, text: card.id })));
  state.defaults = cards[0]?.generation_defaults || {};
  ui.authStatus.textContent = api.currentKey() ? 'Signed in with an API key' : 'Open mode: no key needed';
  ui.changeKey.hidden = !api.currentKey();
  await loadKnowledgeBases();
  // The hash is read again after each wait: a link followed while the page was loading (hashchange) may have
  // opened a conversation already, and an empty chat shown now would replace it.
  const hashId = () => new URLSearchParams(location.hash.slice(1)).get('c');
  if (!hashId() && !state.conversation) showConversation(null);
  await sidebar.refresh();
  const id = hashId();
  // Already open (a link followed while loading): its model is in the picker only now, so its settings are
  // applied again - but not reopened, which would abort a reply the user may have started (Regenerate).
  if (id && state.conversation?.id === id) applyConversationSettings(state.conversation);
  else if (id) await openConversation(id);
  else if (!state.conversation) showConversation(null);
  state.ready = true; // sending waits for this: a message sent earlier would land in a chat about to be replaced
  ui.send.disabled = false;
  ui.prompt.focus();
}

async function boot() {
  try {
    await start(await api.models());
  } catch (error) {
    if (error instanceof api.ApiError && error.status === 401) {
      askForKey(api.currentKey() ? `The saved key was refused: ${error.message}` : '');
    } else {
      showError(`Could not reach the server: ${error.message}`);
    }
  }
}

boot();
