// The page's code editor: CodeMirror 6 with Python highlighting, Tab completion from the
// session (/complete) and Shift+Tab inspection (/inspect). Bundled by page/build.mjs into
// replserver/static/editor.js, which defines window.ReplEditor for app.js; the page's own
// logic (requests, tokens, transcript) stays in app.js, unbundled.

import {
  acceptCompletion,
  autocompletion,
  closeCompletion,
  completionStatus,
  startCompletion,
} from "@codemirror/autocomplete";
import { defaultKeymap, history, historyKeymap, indentMore } from "@codemirror/commands";
import { python, pythonLanguage } from "@codemirror/lang-python";
import {
  bracketMatching,
  indentOnInput,
  indentUnit,
  syntaxHighlighting,
} from "@codemirror/language";
import { EditorSelection, EditorState, Prec, StateEffect, StateField } from "@codemirror/state";
import {
  drawSelection,
  EditorView,
  highlightSpecialChars,
  keymap,
  placeholder,
  showTooltip,
} from "@codemirror/view";
import { classHighlighter, highlightCode } from "@lezer/highlight";

const INDENT = "    ";

// --- offsets: the editor counts UTF-16 units, the server Python characters (code points) ---
export function codePoints(text, utf16) {
  let count = 0;
  for (let i = 0; i < utf16; i++) {
    const unit = text.charCodeAt(i);
    // A high surrogate followed by a low one is one character.
    if (unit >= 0xd800 && unit <= 0xdbff && i + 1 < utf16) {
      const next = text.charCodeAt(i + 1);
      if (next >= 0xdc00 && next <= 0xdfff) i++;
    }
    count++;
  }
  return count;
}

export function utf16Offset(text, points) {
  let i = 0;
  for (let n = 0; n < points && i < text.length; n++) {
    i += text.codePointAt(i) > 0xffff ? 2 : 1;
  }
  return i;
}

// --- the inspection tooltip: shown by Shift+Tab, gone on Escape or any edit --------------
const showInspection = StateEffect.define();

const inspectionField = StateField.define({
  create: () => null,
  update(tooltip, tr) {
    for (const effect of tr.effects) if (effect.is(showInspection)) return effect.value;
    if (tooltip && (tr.docChanged || tr.selection)) return null;
    return tooltip;
  },
  provide: (field) => showTooltip.from(field),
});

function inspectionTooltip(pos, text, kind) {
  return {
    pos,
    kind,
    above: true,
    create() {
      const dom = document.createElement("div");
      dom.className = `cm-inspection ${kind}`;
      dom.setAttribute("role", "tooltip");
      const body = document.createElement("pre");
      body.textContent = text;
      dom.append(body);
      return { dom };
    },
  };
}

// --- the editor -------------------------------------------------------------------------
// options: parent, onRun(), complete(code, cursor) and inspect(code, cursor) (promises of
// the routes' JSON; they throw an Error whose message is shown), onHistory(step) (the
// text of that history entry, or null).
export function create(options) {
  // Matches fetched by Tab, waiting for the completion source to show them as a list.
  let pending = null;

  function request() {
    const state = view.state;
    const code = state.doc.toString();
    const head = state.selection.main.head;
    return { code, head, cursor: codePoints(code, head) };
  }

  function unchanged(asked) {
    const state = view.state;
    return state.selection.main.head === asked.head && state.doc.toString() === asked.code;
  }

  function tell(pos, text, kind) {
    view.dispatch({ effects: showInspection.of(inspectionTooltip(pos, text, kind)) });
  }

  // A session's first completion loads jedi (a second or two): say so while it is slow.
  function slowNotice(asked, text) {
    const timer = setTimeout(() => {
      if (unchanged(asked)) tell(asked.head, text, "waiting");
    }, 300);
    return () => {
      clearTimeout(timer);
      if (view.state.field(inspectionField)?.kind === "waiting") {
        view.dispatch({ effects: showInspection.of(null) });
      }
    };
  }

  function resultOf(asked, reply) {
    const from = utf16Offset(asked.code, reply.cursorStart);
    const to = utf16Offset(asked.code, reply.cursorEnd);
    const matches = [...new Set(reply.matches)];
    return { from, to, matches };
  }

  function asList({ from, to, matches }) {
    // Kept in the server's order; typing on filters the list without asking again.
    return {
      from,
      to,
      options: matches.map((label, index) => ({ label, boost: -Math.min(index, 99) })),
      validFor: /^[\w"']*$/u,
    };
  }

  async function completeAtCursor() {
    const asked = request();
    const done = slowNotice(asked, "Completing…");
    let found;
    try {
      found = resultOf(asked, await options.complete(asked.code, asked.cursor));
    } catch (error) {
      done();
      if (unchanged(asked)) tell(asked.head, error.message, "failed");
      return;
    }
    done();
    if (!unchanged(asked)) return; // typed on meanwhile: the answer is for other code
    const { from, to, matches } = found;
    if (matches.length === 0) {
      tell(asked.head, "No completions", "empty");
    } else if (matches.length === 1) {
      view.dispatch({
        changes: { from, to, insert: matches[0] },
        selection: EditorSelection.cursor(from + matches[0].length),
        userEvent: "input.complete",
        scrollIntoView: true,
      });
    } else {
      pending = { asked, found };
      startCompletion(view);
    }
  }

  async function completionSource(context) {
    if (pending && context.pos === pending.asked.head) {
      const { found } = pending;
      pending = null;
      return asList(found);
    }
    pending = null;
    // Typing went past what the list can filter (a dot, say): ask for the code as it is now.
    const code = context.state.doc.toString();
    try {
      const reply = await options.complete(code, codePoints(code, context.pos));
      if (context.aborted) return null;
      return asList(resultOf({ code }, reply));
    } catch {
      return null;
    }
  }

  function onTab(view) {
    if (completionStatus(view.state) === "active") return acceptCompletion(view);
    const { state } = view;
    const range = state.selection.main;
    if (!range.empty || state.selection.ranges.length > 1) return indentMore(view);
    const line = state.doc.lineAt(range.head);
    const before = line.text.slice(0, range.head - line.from);
    if (/^\s*$/u.test(before)) {
      // Nothing to complete: indent to the next multiple of four columns.
      const spaces = INDENT.length - (before.length % INDENT.length);
      view.dispatch(state.replaceSelection(" ".repeat(spaces)), { userEvent: "input.indent" });
      return true;
    }
    completeAtCursor();
    return true;
  }

  function onShiftTab(view) {
    const asked = request();
    const done = slowNotice(asked, "Inspecting…");
    options.inspect(asked.code, asked.cursor).then(
      (reply) => {
        done();
        if (!unchanged(asked)) return;
        const text = reply.found ? reply.data["text/plain"] : "Nothing known about this name.";
        tell(asked.head, text || "No documentation.", reply.found ? "found" : "empty");
      },
      (error) => {
        done();
        if (unchanged(asked)) tell(asked.head, error.message, "failed");
      },
    );
    return true;
  }

  function onEscape(view) {
    if (!view.state.field(inspectionField)) return false;
    view.dispatch({ effects: showInspection.of(null) });
    return true;
  }

  function historyStep(step) {
    return (view) => {
      const { state } = view;
      const line = state.doc.lineAt(state.selection.main.head);
      const edge = step < 0 ? line.number === 1 : line.number === state.doc.lines;
      if (!edge) return false;
      const text = options.onHistory(step);
      if (text === null || text === undefined) return false;
      setCode(text);
      return true;
    };
  }

  const run = () => {
    closeCompletion(view);
    options.onRun();
    return true;
  };

  const pageKeys = [
    { key: "Mod-Enter", run },
    { key: "Ctrl-Enter", run },
    { key: "Tab", run: onTab },
    { key: "Shift-Tab", run: onShiftTab },
    { key: "Escape", run: onEscape },
    { key: "ArrowUp", run: historyStep(-1) },
    { key: "ArrowDown", run: historyStep(1) },
  ];

  const view = new EditorView({
    parent: options.parent,
    state: EditorState.create({
      doc: "",
      extensions: [
        highlightSpecialChars(),
        history(),
        drawSelection(),
        indentOnInput(),
        bracketMatching(),
        // Stable class names (tok-keyword, tok-string, ...), coloured by the page's style.css.
        syntaxHighlighting(classHighlighter),
        python(),
        indentUnit.of(INDENT),
        EditorState.tabSize.of(4),
        autocompletion({
          override: [completionSource],
          activateOnTyping: false,
          // The list opens only on an explicit Tab, so a key pressed right after it (Enter,
          // an arrow) is meant for it: CodeMirror's default 75 ms guard would drop it.
          interactionDelay: 0,
          icons: false,
          maxRenderedOptions: 200,
        }),
        inspectionField,
        Prec.high(keymap.of(pageKeys)),
        keymap.of([...defaultKeymap, ...historyKeymap]),
        placeholder(options.placeholder || ""),
        EditorView.contentAttributes.of({
          "aria-label": "Python code",
          autocapitalize: "off",
          spellcheck: "false",
        }),
      ],
    }),
  });

  function setCode(text) {
    view.dispatch({
      changes: { from: 0, to: view.state.doc.length, insert: text },
      selection: EditorSelection.cursor(text.length),
      scrollIntoView: true,
    });
  }

  return {
    view,
    getCode: () => view.state.doc.toString(),
    setCode,
    focus: () => view.focus(),
  };
}

// The transcript's copy of code that ran, highlighted as the editor shows it.
export function highlight(code, parent) {
  const tree = pythonLanguage.parser.parse(code);
  highlightCode(
    code,
    tree,
    classHighlighter,
    (text, classes) => {
      if (!classes) return parent.append(text);
      const span = document.createElement("span");
      span.className = classes;
      span.textContent = text;
      parent.append(span);
    },
    () => parent.append("\n"),
  );
}

window.ReplEditor = { create, highlight, codePoints, utf16Offset };
