"""What user code sees of a REPL: results, rich displays, input() and matplotlib figures.

runner_child.py makes one Repl for the session and hands it what it needs: the session's
module, a way to send a frame in order with the output, a way to wait for an input answer,
the traceback printer and fd 2. Apart from install_hooks, nothing here runs before the
first execution. Stdlib only; modules beyond the runner's own (json, binascii) load on
first use.
"""

from __future__ import annotations

import builtins
import io
import sys

from replchild.wire import T_DISPLAY, T_RESULT

TYPE_CHECKING = False  # typing costs ~10 ms to import; mypy honours this name
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

# IPython's display convention: method name -> mime type, in the order they are tried.
REPR_METHODS = (
    ("_repr_png_", "image/png"),
    ("_repr_jpeg_", "image/jpeg"),
    ("_repr_svg_", "image/svg+xml"),
    ("_repr_html_", "text/html"),
    ("_repr_markdown_", "text/markdown"),
    ("_repr_json_", "application/json"),
)


class Repl:
    """The REPL front ends of one session, built on the runner's frame channel."""

    def __init__(
        self,
        module: ModuleType,
        *,
        send: Callable[[int, bytes], bool],
        ask: Callable[[bytes, bool], str],
        report: Callable[[BaseException], None],
        write_stderr: Callable[[bytes], None],
        max_frame: int,
        max_result: int,
    ) -> None:
        self.module = module  # the session's __main__, whose `_` follows the results
        # send(kind, payload): a frame after all output written before it; False in a
        # process with no protocol (a copy made by os.fork()).
        self.send = send
        self.ask = ask  # ask(prompt, password): the client's answer; raises EOFError
        self.report = report  # prints a traceback without the runner's frames
        self.write_stderr = write_stderr
        self.max_frame = max_frame
        self.max_result = max_result  # characters of a repr or prompt before it is cut
        self.pyplot_show: Callable[..., None] | None = None  # our pyplot.show, once patched

    def install_hooks(self) -> None:
        """What a REPL offers: results, display(), input(), getpass and matplotlib figures."""
        sys.displayhook = self.displayhook
        builtins.display = self.display  # type: ignore[attr-defined]
        builtins.input = self.input
        # getpass and pyplot are patched the moment they are imported (if ever): a finder
        # that only answers for these two names costs the other imports one dict lookup.
        patches = {"getpass": self._patch_getpass, "matplotlib.pyplot": self._patch_pyplot}
        for name, patch in list(patches.items()):
            if name in sys.modules:
                patch(sys.modules[name])
        sys.meta_path.insert(0, PatchOnImport(patches))

    # --- results and displays ---------------------------------------------------------------
    def displayhook(self, value: object) -> None:
        """sys.displayhook: show a final expression's value (nothing for None), keep it in `_`."""
        if value is None:
            return
        previous = getattr(builtins, "_", None)
        builtins._ = None  # type: ignore[attr-defined]  # as the REPL: not kept if repr fails
        bundle = self.mime_bundle(value)
        if bundle is None:
            self.send(T_RESULT, self._utf8(self.cut(repr(value))))
        elif len(bundle) == 1:  # text only, from _repr_mimebundle_
            self.send(T_RESULT, self._utf8(str(bundle["text/plain"])))
        else:
            self.send_display(bundle)
        builtins._ = value  # type: ignore[attr-defined]
        # The namespace's `_` follows too, unless the code gave `_` a value of its own (as
        # IPython does: `for _ in ...` or gettext's `_` are left alone).
        namespace = self.module.__dict__
        if namespace.get("_", previous) is previous:
            namespace["_"] = value

    def display(self, *objs: object, raw: bool = False, **ignored: object) -> None:
        """Show objects as rich output, as IPython's display() does (`raw`: objects are
        mime bundles already); IPython's other keyword arguments are accepted and ignored."""
        for obj in objs:
            if raw and isinstance(obj, dict):
                bundle = self._normalise(obj, self.cut(str(obj.get("text/plain", ""))))
            else:
                bundle = self.mime_bundle(obj) or {"text/plain": self.cut(repr(obj))}
            self.send_display(bundle)

    def send_display(self, bundle: dict[str, object]) -> None:
        import json

        try:
            payload = json.dumps(bundle).encode()
        except (TypeError, ValueError) as exc:
            self._warn(f"display data is not JSON-serialisable ({exc}); shown as text only")
            payload = json.dumps({"text/plain": bundle.get("text/plain", "")}).encode()
        if len(payload) > self.max_frame:
            self._warn(
                f"a display of {len(payload)} bytes exceeds the {self.max_frame}-byte frame"
                " limit (REPL_MAX_FRAME_BYTES); shown as text only"
            )
            payload = json.dumps({"text/plain": bundle.get("text/plain", "")}).encode()
        if not self.send(T_DISPLAY, payload):
            print(bundle.get("text/plain", ""))  # a forked copy shows what it can, as text

    def mime_bundle(self, value: object) -> dict[str, object] | None:
        """The representations of `value` by mime type (text/plain always among them), or
        None if it has no rich ones."""
        if isinstance(value, type):  # a class's _repr_*_ are unbound functions
            return None
        found: dict[object, object] = {}
        method = _lookup(value, "_repr_mimebundle_")
        if method is not None:
            data = self._call_repr(value, "_repr_mimebundle_", method, include=None, exclude=None)
            if isinstance(data, tuple) and data:
                data = data[0]  # (data, metadata)
            if isinstance(data, dict):
                found.update(data)
        for name, mime in REPR_METHODS:
            method = _lookup(value, name)
            if method is not None and found.get(mime) is None:
                data = self._call_repr(value, name, method)
                found[mime] = data[0] if isinstance(data, tuple) and data else data
        figure_module = sys.modules.get("matplotlib.figure")
        if figure_module is not None and isinstance(value, figure_module.Figure):
            found["image/png"] = _figure_png(value)
        plain = found.pop("text/plain", None)
        if not isinstance(plain, str) and all(item is None for item in found.values()):
            return None  # None from a _repr_*_ method means "not available"
        return self._normalise(found, self.cut(plain if isinstance(plain, str) else repr(value)))

    def _call_repr(
        self, value: object, name: str, method: Callable[..., object], **kwargs: object
    ) -> object:
        try:
            return method(**kwargs)
        except Exception as exc:  # noqa: BLE001 - IPython too shows the rest and a traceback
            self.report(exc)
            self._warn(f"{type(value).__name__}.{name}() failed; shown without it")
            return None

    @staticmethod
    def _normalise(data: dict[object, object], plain: str) -> dict[str, object]:
        """Text stays text, JSON types stay JSON, binary becomes base64; None is left out."""
        from binascii import b2a_base64

        bundle: dict[str, object] = {}
        for mime, item in data.items():
            if not isinstance(mime, str) or item is None:
                continue
            if isinstance(item, bytes | bytearray | memoryview):
                bundle[mime] = b2a_base64(item, newline=False).decode("ascii")
            elif isinstance(item, str) or mime == "application/json" or mime.endswith("+json"):
                bundle[mime] = item
        bundle["text/plain"] = plain
        return bundle

    def cut(self, text: str) -> str:
        """`text`, or its head and a marker if it is longer than the configured limit."""
        if len(text) <= self.max_result:
            return text
        return f"{text[: self.max_result]}… [truncated: {len(text)} characters in all]"

    def _utf8(self, text: str) -> bytes:
        data = text.encode("utf-8", "backslashreplace")
        # Characters can take up to 10 bytes each (escaped lone surrogates): stay in a frame.
        room = self.max_frame - 16
        return data if len(data) <= room else data[:room]

    def _warn(self, message: str) -> None:
        self.write_stderr(f"[replserver] {message}\n".encode("utf-8", "backslashreplace"))

    # --- matplotlib -----------------------------------------------------------------------
    def _patch_pyplot(self, pyplot: ModuleType) -> None:
        # MPLBACKEND=Agg (set by the server): plt.show() renders into the output instead. A
        # plain function: pyplot sets attributes (__signature__) on its show().
        def show(*args: object, **kwargs: object) -> None:
            """Show every open figure as an image in the output, then close them."""
            self.show_figures()

        self.pyplot_show = show
        pyplot.__dict__["show"] = show

    def show_figures(self) -> None:
        """pyplot.show(): every open figure becomes an image/png display, then is closed."""
        pyplot = sys.modules["matplotlib.pyplot"]
        helpers = sys.modules["matplotlib._pylab_helpers"]
        try:
            for manager in helpers.Gcf.get_all_fig_managers():
                self.display(manager.canvas.figure)
        finally:
            pyplot.close("all")

    def flush_figures(self) -> None:
        """At the end of an execution: show the figures it left open (if show() is ours)."""
        pyplot = sys.modules["matplotlib.pyplot"]
        if getattr(pyplot, "show", None) is self.pyplot_show:
            self.show_figures()

    # --- input ----------------------------------------------------------------------------
    def input(self, prompt: object = "") -> str:
        """builtins.input: asks the stream's client; the prompt and answer are echoed."""
        value = self.ask(self._utf8(self.cut(str(prompt))), False)
        try:
            sys.stdout.write(f"{prompt}{value}\n")
            sys.stdout.flush()
        except BaseException:  # noqa: BLE001 - user may have replaced or closed it
            pass
        return value

    def getpass(self, prompt: str = "Password: ", stream: object = None) -> str:
        """getpass.getpass: asks the stream's client; nothing is echoed."""
        return self.ask(self._utf8(self.cut(str(prompt))), True)

    def _patch_getpass(self, module: ModuleType) -> None:
        module.__dict__["getpass"] = self.getpass


def _lookup(value: object, name: str) -> Callable[..., object] | None:
    """A `_repr_*_` method of `value`, or None; a failing attribute lookup counts as none."""
    try:
        method = getattr(value, name, None)
    except Exception:  # noqa: BLE001 - a property or __getattr__ of user code may raise
        return None
    return method if callable(method) else None


def _figure_png(figure: object) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")  # type: ignore[attr-defined]
    return buffer.getvalue()


class PatchOnImport:
    """A meta path finder for a few module names: each is patched right after it executes,
    so `from getpass import getpass` in the same cell already gets the patched function."""

    def __init__(self, patches: dict[str, Callable[[ModuleType], None]]) -> None:
        self.patches = patches

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        patch = self.patches.get(name)
        if patch is None:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec: ModuleSpec | None = find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            patch(module)

        try:
            loader.exec_module = exec_and_patch  # type: ignore[method-assign,union-attr]
        except AttributeError:  # a loader with slots: the module stays unpatched
            pass
        return spec
