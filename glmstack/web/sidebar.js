// The conversation list: search, paging, rename in place, delete after a confirmation. It calls back into the
// page (`open`, `onDeleted`, `onError`) and never touches the chat itself.

import * as api from './api.js';
import { el } from './render.js';

const PAGE = 50;

export function createSidebar({ open, onDeleted, onRenamed, onError, currentId }) {
  const list = document.getElementById('conversations');
  const search = document.getElementById('search');
  const more = document.getElementById('more-conversations');
  const confirmDialog = document.getElementById('confirm-dialog');
  let query = '';
  let lastId = null;
  let searchTimer = null;
  let generation = 0; // a newer refresh wins over a slower older one

  function item(conversation) {
    const li = el('li', { class: 'conversation', 'data-id': conversation.id });
    const link = el('button', { type: 'button', class: 'conversation-link', title: conversation.title || 'Untitled' },
      el('span', { class: 'conversation-name', text: conversation.title || 'Untitled' }));
    if (conversation.id === currentId()) link.setAttribute('aria-current', 'true');
    link.addEventListener('click', () => open(conversation.id));
    const rename = el('button', { type: 'button', class: 'icon-button small rename',
      'aria-label': `Rename ${conversation.title || 'conversation'}`, title: 'Rename' });
    rename.textContent = '\u270E';
    rename.addEventListener('click', () => startRename(li, conversation));
    const remove = el('button', { type: 'button', class: 'icon-button small delete',
      'aria-label': `Delete ${conversation.title || 'conversation'}`, title: 'Delete' });
    remove.textContent = '\u2715';
    remove.addEventListener('click', () => confirmDelete(conversation));
    li.append(link, rename, remove);
    return li;
  }

  function startRename(li, conversation) {
    const input = el('input', { type: 'text', class: 'rename-input', 'aria-label': 'New title',
      maxlength: '200' });
    input.value = conversation.title || '';
    const form = el('form', { class: 'rename-form' }, input);
    let done = false;
    const finish = async (save) => {
      if (done) return;
      done = true;
      const title = input.value.trim();
      if (save && title && title !== conversation.title) {
        try {
          const updated = await api.updateConversation(conversation.id, { title });
          onRenamed(updated);
        } catch (e) {
          onError(e);
        }
      }
      await refresh();
    };
    form.addEventListener('submit', (event) => { event.preventDefault(); finish(true); });
    input.addEventListener('keydown', (event) => {
      if (event.key === 'Escape') { event.preventDefault(); finish(false); }
    });
    input.addEventListener('blur', () => finish(true));
    li.replaceChildren(form);
    input.focus();
    input.select();
  }

  function confirmDelete(conversation) {
    document.getElementById('confirm-text').textContent =
      `Delete \u201C${conversation.title || 'Untitled'}\u201D? This cannot be undone.`;
    confirmDialog.returnValue = '';
    confirmDialog.addEventListener('close', async () => {
      if (confirmDialog.returnValue !== 'ok') return;
      try {
        await api.deleteConversation(conversation.id);
        onDeleted(conversation.id);
      } catch (e) {
        onError(e);
      }
      await refresh();
    }, { once: true });
    confirmDialog.showModal();
  }

  async function load(append) {
    const mine = ++generation;
    const page = await api.listConversations({ q: query, after: append ? lastId : '', limit: PAGE });
    if (mine !== generation) return;
    const items = page.data.map(item);
    if (append) list.append(...items);
    else list.replaceChildren(...items);
    if (!list.children.length) {
      list.append(el('li', { class: 'empty muted', text: query ? 'No conversation matches.' : 'No conversations yet.' }));
    }
    lastId = page.data.length ? page.data[page.data.length - 1].id : lastId;
    more.hidden = !page.has_more;
  }

  async function refresh() {
    try {
      await load(false);
    } catch (e) {
      onError(e);
    }
  }

  search.addEventListener('input', () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => { query = search.value.trim(); refresh(); }, 250);
  });
  more.addEventListener('click', () => load(true).catch(onError));

  function markCurrent() {
    for (const link of list.querySelectorAll('.conversation-link')) {
      if (link.parentElement.dataset.id === currentId()) link.setAttribute('aria-current', 'true');
      else link.removeAttribute('aria-current');
    }
  }

  function clear() {
    list.replaceChildren();
    more.hidden = true;
  }

  return { refresh, markCurrent, clear };
}
