// Messages as DOM: Markdown (marked) sanitized with DOMPurify before it is inserted (model output is
// untrusted), code blocks highlighted (highlight.js) with a copy button, reasoning and tool calls shown apart.

import { marked } from './vendor/marked.esm.js';
import DOMPurify from './vendor/purify.es.mjs';
import hljs from './vendor/highlight.min.js';

marked.setOptions({ gfm: true, breaks: false });

DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A' && node.hasAttribute('href')) {
    node.setAttribute('target', '_blank');
    node.setAttribute('rel', 'noopener noreferrer');
  }
});

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'class') node.className = value;
    else if (name === 'text') node.textContent = value;
    else node.setAttribute(name, value === true ? '' : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

export function renderMarkdown(target, text) {
  target.innerHTML = DOMPurify.sanitize(marked.parse(text));
  for (const code of target.querySelectorAll('pre > code')) {
    const language = /language-([\w+#.-]+)/.exec(code.className)?.[1];
    if (language && hljs.getLanguage(language)) {
      code.innerHTML = hljs.highlight(code.textContent, { language, ignoreIllegals: true }).value;
    } else {
      code.innerHTML = hljs.highlightAuto(code.textContent).value;
    }
    code.classList.add('hljs');
    const pre = code.parentElement;
    const bar = el('div', { class: 'code-bar' },
      el('span', { class: 'code-language', text: language || 'code' }),
      el('button', { type: 'button', class: 'copy-code', text: 'Copy', 'aria-label': 'Copy code' }));
    const block = el('div', { class: 'code-block' });
    pre.replaceWith(block);
    block.append(bar, pre);
  }
}

export async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // not a secure context (a LAN address over http): the old way
    const area = el('textarea', { class: 'visually-hidden' });
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand('copy');
    area.remove();
  }
  if (button) {
    const label = button.textContent;
    button.textContent = 'Copied';
    setTimeout(() => { button.textContent = label; }, 1200);
  }
}

function toolCallView(call) {
  const fn = call.function || {};
  let args = fn.arguments ?? '';
  try {
    args = JSON.stringify(JSON.parse(args), null, 2);
  } catch {
    // still streaming, or not JSON: as sent
  }
  const name = fn.name || call.type || 'tool';
  const details = el('details', { class: 'tool-call', open: true },
    el('summary', { text: `Tool call: ${name}` }));
  const pre = el('pre', {}, el('code', { text: typeof args === 'string' ? args : String(args) }));
  details.append(pre);
  return details;
}

function metaLine(meta) {
  if (!meta) return '';
  const parts = [];
  if (meta.model) parts.push(meta.model);
  if (meta.usage?.completion_tokens !== undefined) parts.push(`${meta.usage.completion_tokens} tokens`);
  if (meta.finish_reason && meta.finish_reason !== 'stop') {
    parts.push(meta.finish_reason === 'abort' ? 'stopped' : meta.finish_reason);
  }
  return parts.join(' · ');
}

// One message's element. An assistant message keeps its parts in fixed slots so a stream can update them:
// call `update(message)` again with the grown message.
export function messageView(message, { last = false, streaming = false } = {}) {
  const article = el('article', { class: `message ${message.role}`, 'data-role': message.role });
  if (message.position !== undefined) article.dataset.position = String(message.position);
  if (message.role === 'user' || message.role === 'system') {
    article.append(el('div', { class: 'bubble', text: message.content || '' }));
    article.append(el('div', { class: 'actions' },
      el('button', { type: 'button', class: 'copy-message', text: 'Copy' })));
    return { article, update() {} };
  }
  const reasoning = el('details', { class: 'reasoning', hidden: true }, el('summary', { text: 'Thinking' }),
    el('div', { class: 'reasoning-text' }));
  const tools = el('div', { class: 'tool-calls' });
  const body = el('div', { class: 'markdown content' });
  const error = el('div', { class: 'message-error', role: 'alert', hidden: true });
  const meta = el('span', { class: 'meta muted' });
  const actions = el('div', { class: 'actions' },
    el('button', { type: 'button', class: 'copy-message', text: 'Copy' }));
  if (last) actions.append(el('button', { type: 'button', class: 'regenerate', text: 'Regenerate' }));
  actions.append(meta);
  article.append(reasoning, tools, body, error, actions);

  let shownContent = null;
  let shownReasoning = null;
  let shownTools = null;
  function update(m) {
    article.classList.toggle('streaming', Boolean(m.streaming));
    if (m.reasoning_content && m.reasoning_content !== shownReasoning) {
      reasoning.hidden = false;
      reasoning.lastChild.textContent = m.reasoning_content;
      shownReasoning = m.reasoning_content;
    }
    const toolsKey = m.tool_calls?.length ? JSON.stringify(m.tool_calls) : null;
    if (toolsKey !== shownTools) {
      tools.replaceChildren(...(m.tool_calls || []).map(toolCallView));
      shownTools = toolsKey;
    }
    if ((m.content || '') !== shownContent) {
      renderMarkdown(body, m.content || '');
      shownContent = m.content || '';
    }
    error.hidden = !m.error;
    error.textContent = m.error || '';
    meta.textContent = metaLine(m.meta);
    actions.hidden = Boolean(m.streaming);
  }
  update({ ...message, streaming });
  return { article, update };
}
