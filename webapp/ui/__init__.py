"""The Gradio chat page at `/`, streaming from the same engine object as the API.

A custom `gr.Blocks` page (ChatInterface has no room for per-reply stats or a language switch):

- chat: streaming replies, stop, retry, undo, clear, copy buttons; the conversation, the language and
  the settings live in the browser (`gr.BrowserState`, localStorage), so a reload keeps them;
- settings: system message and every sampling knob of the API, with the API's defaults;
- Bahasa Indonesia first, English on a switch;
- under each reply, honest stats from the engine's `GenerationResult`; failures and busy states are
  notes in the chat, in words, never a traceback.

Notes (stats, errors, "stopped") are assistant messages with a `metadata.title`; they are shown but
never sent back to the model.

The modules: `texts` (the words, both languages), `chat` (the logic, tested without a browser), `layout` (the
Blocks and `mount_ui`). `webapp.server` mounts the page with `webapp.ui.layout.mount_ui`.
"""
