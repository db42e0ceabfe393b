"""Discovery through real dist-info metadata: registration, conflicts, failures, selection."""

from __future__ import annotations

import os
import sys
import threading
import warnings

import pytest
from conftest import spec_plugin_source

import dspark_core
from dspark_core import (
    DSPARK_DRAFT_REGISTRY,
    DraftClassImportError,
    DraftSpecConflictError,
    DraftSpecNotFoundError,
    DSparkDraftSpec,
    DSparkPluginWarning,
    PluginLoadError,
    hookimpl,
    resolve_dspark_draft_spec,
)
from dspark_core.spec import spec_reference


def test_one_plugin_registers_two_architectures(plugin_site):
    plugin_site(
        "fam-alpha",
        "1.2",
        entry_points={"alpha": "fam_alpha"},
        modules={
            "fam_alpha": spec_plugin_source(
                {"AlphaForCausalLM": "fam_alpha_model:Draft", "AlphaMoeForCausalLM": "fam_alpha_model:Draft"}
            )
        },
    )
    assert "AlphaForCausalLM" in DSPARK_DRAFT_REGISTRY
    assert "AlphaMoeForCausalLM" in DSPARK_DRAFT_REGISTRY
    spec = resolve_dspark_draft_spec(["AlphaMoeForCausalLM"])
    assert spec.reference == "fam_alpha_model:Draft"
    assert DSPARK_DRAFT_REGISTRY["AlphaForCausalLM"] == spec
    entry = DSPARK_DRAFT_REGISTRY.report().entries["AlphaForCausalLM"]
    assert (entry.plugin.distribution, entry.plugin.version, entry.plugin.name) == (
        "fam-alpha",
        "1.2",
        "alpha",
    )


def test_two_plugins_with_different_architectures(plugin_site):
    plugin_site(
        "fam-a", entry_points={"a": "fam_a"}, modules={"fam_a": spec_plugin_source({"AForLM": "fam_a:A"})}
    )
    plugin_site(
        "fam-b", entry_points={"b": "fam_b"}, modules={"fam_b": spec_plugin_source({"BForLM": "fam_b:B"})}
    )
    assert {"AForLM", "BForLM"} <= set(DSPARK_DRAFT_REGISTRY)
    assert len(DSPARK_DRAFT_REGISTRY) >= 2
    assert resolve_dspark_draft_spec(["BForLM"]).reference == "fam_b:B"


def test_first_registered_architecture_in_caller_order_wins(plugin_site):
    plugin_site(
        "fam-a",
        entry_points={"a": "fam_a"},
        modules={"fam_a": spec_plugin_source({"AForLM": "fam_a:A", "A2ForLM": "fam_a:A2"})},
    )
    assert resolve_dspark_draft_spec(["Unknown", "A2ForLM", "AForLM"]).reference == "fam_a:A2"
    assert resolve_dspark_draft_spec(("AForLM", "A2ForLM")).reference == "fam_a:A"


def test_conflict_names_both_distributions_and_other_architectures_still_resolve(plugin_site):
    plugin_site(
        "fam-one",
        "1.0",
        entry_points={"one": "fam_one"},
        modules={"fam_one": spec_plugin_source({"SharedForLM": "fam_one:D", "OneForLM": "fam_one:D"})},
    )
    plugin_site(
        "fam-two",
        "2.5",
        entry_points={"two": "fam_two"},
        modules={"fam_two": spec_plugin_source({"SharedForLM": "fam_two:D"})},
    )
    with pytest.raises(DraftSpecConflictError) as info:
        resolve_dspark_draft_spec(["SharedForLM"])
    message = str(info.value)
    assert "fam-one 1.0" in message and "fam-two 2.5" in message
    assert "DSPARK_DISABLE_PLUGINS" in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(DraftSpecConflictError):
        DSPARK_DRAFT_REGISTRY["SharedForLM"]
    assert resolve_dspark_draft_spec(["OneForLM"]).reference == "fam_one:D"


def test_conflict_is_resolved_by_the_deny_list(plugin_site, monkeypatch):
    plugin_site(
        "fam-one",
        entry_points={"one": "fam_one"},
        modules={"fam_one": spec_plugin_source({"SharedForLM": "fam_one:D"})},
    )
    plugin_site(
        "fam-two",
        entry_points={"two": "fam_two"},
        modules={"fam_two": spec_plugin_source({"SharedForLM": "fam_two:D"})},
    )
    monkeypatch.setenv("DSPARK_DISABLE_PLUGINS", "fam-two")
    DSPARK_DRAFT_REGISTRY.refresh()
    assert resolve_dspark_draft_spec(["SharedForLM"]).reference == "fam_one:D"


def test_same_spec_from_two_distributions_is_not_a_conflict(plugin_site):
    plugin_site(
        "fam-one",
        entry_points={"one": "fam_one"},
        modules={"fam_one": spec_plugin_source({"SameForLM": "fam_shared:D"})},
    )
    plugin_site(
        "fam-two",
        entry_points={"two": "fam_two"},
        modules={"fam_two": spec_plugin_source({"SameForLM": "fam_shared:D"})},
    )
    assert resolve_dspark_draft_spec(["SameForLM"]).reference == "fam_shared:D"


def test_same_distribution_found_twice_is_deduplicated(plugin_site, tmp_path, monkeypatch):
    from conftest import write_distribution

    source = spec_plugin_source({"TwiceForLM": "fam_twice:D"})
    plugin_site("fam-twice", "1.0", entry_points={"twice": "fam_twice"}, modules={"fam_twice": source})
    # A stale second copy of the same distribution on another sys.path entry.
    other = tmp_path / "other-site"
    write_distribution(other, "fam-twice", "0.9", entry_points={"twice": "fam_twice"})
    monkeypatch.syspath_prepend(str(other))
    DSPARK_DRAFT_REGISTRY.refresh()
    assert resolve_dspark_draft_spec(["TwiceForLM"]).reference == "fam_twice:D"
    report = DSPARK_DRAFT_REGISTRY.report()
    assert report.entries["TwiceForLM"].status == "ok"
    assert len(report.entries["TwiceForLM"].providers) == 1
    assert any(d.startswith("fam-twice") for d in report.duplicates)


def _other_plugin(plugin_site):
    plugin_site(
        "fam-good",
        entry_points={"good": "fam_good"},
        modules={"fam_good": spec_plugin_source({"GoodForLM": "fam_good:D"})},
    )


def _failure_for(distribution):
    return [f for f in DSPARK_DRAFT_REGISTRY.report().failures if f.plugin.distribution == distribution]


def test_plugin_with_import_error_is_recorded_and_skipped(plugin_site):
    _other_plugin(plugin_site)
    plugin_site(
        "fam-broken",
        "3.1",
        entry_points={"broken": "fam_broken"},
        modules={"fam_broken": "import fam_module_that_does_not_exist\n"},
    )
    with pytest.warns(DSparkPluginWarning, match="fam-broken 3.1"):
        assert resolve_dspark_draft_spec(["GoodForLM"]).reference == "fam_good:D"
    (failure,) = _failure_for("fam-broken")
    assert failure.stage == "import"
    assert failure.plugin.name == "broken" and failure.plugin.version == "3.1"
    assert "fam_module_that_does_not_exist" in failure.error
    with pytest.raises(DraftSpecNotFoundError, match="fam-broken"):
        resolve_dspark_draft_spec(["BrokenForLM"])


def test_failure_is_warned_about_once(plugin_site):
    plugin_site(
        "fam-broken",
        entry_points={"broken": "fam_broken"},
        modules={"fam_broken": "raise RuntimeError('x')\n"},
    )
    with pytest.warns(DSparkPluginWarning) as record:
        list(DSPARK_DRAFT_REGISTRY)
        DSPARK_DRAFT_REGISTRY.refresh()
        list(DSPARK_DRAFT_REGISTRY)
    assert len([w for w in record if "fam-broken" in str(w.message)]) == 1


def test_hook_that_raises_is_recorded_and_skipped(plugin_site):
    _other_plugin(plugin_site)
    source = (
        "from dspark_core import hookimpl\n\n"
        "@hookimpl\ndef dspark_draft_specs():\n    raise KeyError('boom')\n"
    )
    plugin_site("fam-raises", entry_points={"raises": "fam_raises"}, modules={"fam_raises": source})
    with pytest.warns(DSparkPluginWarning, match="fam-raises"):
        assert "GoodForLM" in DSPARK_DRAFT_REGISTRY
    (failure,) = _failure_for("fam-raises")
    assert failure.stage == "hook" and "boom" in failure.error


@pytest.mark.parametrize(
    "returned",
    ["['not', 'a', 'mapping']", "{1: DSparkDraftSpec('fam_x:D')}", "{'XForLM': 'fam_x:D'}", "None"],
)
def test_invalid_return_value_is_recorded_and_skipped(plugin_site, returned):
    _other_plugin(plugin_site)
    source = (
        "from dspark_core import DSparkDraftSpec, hookimpl\n\n"
        f"@hookimpl\ndef dspark_draft_specs():\n    return {returned}\n"
    )
    plugin_site("fam-invalid", entry_points={"invalid": "fam_invalid"}, modules={"fam_invalid": source})
    with pytest.warns(DSparkPluginWarning, match="fam-invalid"):
        assert "GoodForLM" in DSPARK_DRAFT_REGISTRY
    (failure,) = _failure_for("fam-invalid")
    assert failure.stage == "result"
    assert "XForLM" not in DSPARK_DRAFT_REGISTRY


def test_malformed_entry_point_is_recorded_and_skipped(plugin_site):
    _other_plugin(plugin_site)
    plugin_site("fam-malformed", entry_points={"malformed": "not a module path!"})
    with pytest.warns(DSparkPluginWarning, match="malformed"):
        assert "GoodForLM" in DSPARK_DRAFT_REGISTRY
    (failure,) = _failure_for("fam-malformed")
    assert failure.stage == "entry-point"


def test_misspelt_hook_is_reported_by_pluggy_validation(plugin_site):
    source = (
        "from dspark_core import DSparkDraftSpec, hookimpl\n\n"
        "@hookimpl\ndef dspark_draft_spec():\n    return {'TypoForLM': DSparkDraftSpec('fam_typo:D')}\n"
    )
    plugin_site("fam-typo", entry_points={"typo": "fam_typo"}, modules={"fam_typo": source})
    with pytest.warns(DSparkPluginWarning, match="dspark_draft_spec"):
        assert "TypoForLM" not in DSPARK_DRAFT_REGISTRY
    (failure,) = _failure_for("fam-typo")
    assert failure.stage == "validation"


def test_strict_mode_turns_failures_into_errors(plugin_site, monkeypatch):
    _other_plugin(plugin_site)
    plugin_site("fam-broken", entry_points={"broken": "fam_broken"}, modules={"fam_broken": "1/0\n"})
    monkeypatch.setenv("DSPARK_STRICT_PLUGINS", "1")
    DSPARK_DRAFT_REGISTRY.refresh()
    with pytest.raises(PluginLoadError, match="fam-broken"):
        resolve_dspark_draft_spec(["GoodForLM"])


def _selection_site(plugin_site):
    plugin_site(
        "fam-keep",
        entry_points={"keep": "fam_keep"},
        modules={"fam_keep": spec_plugin_source({"KeepForLM": "fam_keep:D"})},
    )
    plugin_site(
        "fam-drop",
        entry_points={"drop": "fam_drop"},
        modules={"fam_drop": "raise AssertionError('fam_drop must not be imported')\n"},
    )


@pytest.mark.parametrize("deny", ["drop", "fam-drop", "fam_drop", " fam-drop ,"])
def test_deny_list_imports_nothing_it_names(plugin_site, monkeypatch, deny):
    _selection_site(plugin_site)
    monkeypatch.setenv("DSPARK_DISABLE_PLUGINS", deny)
    DSPARK_DRAFT_REGISTRY.refresh()
    assert "KeepForLM" in DSPARK_DRAFT_REGISTRY
    assert "fam_drop" not in sys.modules
    blocked = [p for p in DSPARK_DRAFT_REGISTRY.report().plugins if p.status == "blocked"]
    assert [p.distribution for p in blocked] == ["fam-drop"]


def test_allow_list_imports_only_what_it_names(plugin_site, monkeypatch):
    _selection_site(plugin_site)
    monkeypatch.setenv("DSPARK_PLUGINS", "keep")
    DSPARK_DRAFT_REGISTRY.refresh()
    assert list(DSPARK_DRAFT_REGISTRY) == ["KeepForLM"]
    assert "fam_drop" not in sys.modules


def test_autoload_off_loads_no_entry_points(plugin_site, monkeypatch):
    _selection_site(plugin_site)
    monkeypatch.setenv("DSPARK_DISABLE_PLUGIN_AUTOLOAD", "1")
    DSPARK_DRAFT_REGISTRY.refresh()
    assert len(DSPARK_DRAFT_REGISTRY) == 0
    assert "fam_keep" not in sys.modules and "fam_drop" not in sys.modules


def test_unknown_selection_name_warns(plugin_site, monkeypatch):
    _other_plugin(plugin_site)
    monkeypatch.setenv("DSPARK_DISABLE_PLUGINS", "fam-nonexistent")
    DSPARK_DRAFT_REGISTRY.refresh()
    with pytest.warns(DSparkPluginWarning, match="fam-nonexistent"):
        assert "GoodForLM" in DSPARK_DRAFT_REGISTRY


def test_refresh_sees_a_distribution_installed_after_discovery(plugin_site):
    from conftest import write_distribution

    _other_plugin(plugin_site)
    assert "LateForLM" not in DSPARK_DRAFT_REGISTRY
    write_distribution(
        plugin_site.site,
        "fam-late",
        entry_points={"late": "fam_late"},
        modules={"fam_late": spec_plugin_source({"LateForLM": "fam_late:D"})},
    )
    assert "LateForLM" not in DSPARK_DRAFT_REGISTRY  # cached until refresh()
    dspark_core.refresh()
    assert resolve_dspark_draft_spec(["LateForLM"]).reference == "fam_late:D"


def test_discovery_runs_once_and_is_thread_safe(plugin_site):
    counter = "fam_counted_calls"
    source = (
        "import builtins\nfrom dspark_core import DSparkDraftSpec, hookimpl\n\n"
        "@hookimpl\ndef dspark_draft_specs():\n"
        f"    builtins.{counter} = getattr(builtins, {counter!r}, 0) + 1\n"
        "    return {'CountedForLM': DSparkDraftSpec('fam_counted:D')}\n"
    )
    plugin_site("fam-counted", entry_points={"counted": "fam_counted"}, modules={"fam_counted": source})
    import builtins

    threads = [threading.Thread(target=lambda: "CountedForLM" in DSPARK_DRAFT_REGISTRY) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert getattr(builtins, counter) == 1
    delattr(builtins, counter)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_discovery_is_redone_in_a_forked_child(plugin_site):
    _other_plugin(plugin_site)
    assert "GoodForLM" in DSPARK_DRAFT_REGISTRY
    parent_report = DSPARK_DRAFT_REGISTRY.report()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(read)
        redone = DSPARK_DRAFT_REGISTRY.report() is not parent_report
        os.write(write, b"1" if redone and "GoodForLM" in DSPARK_DRAFT_REGISTRY else b"0")
        os._exit(0)
    os.close(write)
    result = os.read(read, 1)
    os.waitpid(pid, 0)
    assert result == b"1"
    assert DSPARK_DRAFT_REGISTRY.report() is parent_report


def test_registry_is_read_only():
    with pytest.raises(TypeError, match="register_spec"):
        DSPARK_DRAFT_REGISTRY["XForLM"] = DSparkDraftSpec("fam_x:D")  # type: ignore[index]
    with pytest.raises(TypeError, match="read-only"):
        del DSPARK_DRAFT_REGISTRY["XForLM"]  # type: ignore[attr-defined]


def test_bare_string_is_a_type_error():
    with pytest.raises(TypeError, match=r"\['Qwen3ForCausalLM'\]"):
        resolve_dspark_draft_spec("Qwen3ForCausalLM")  # type: ignore[arg-type]


def test_empty_and_non_string_architectures():
    with pytest.raises(ValueError, match="empty"):
        resolve_dspark_draft_spec([])
    with pytest.raises(TypeError):
        resolve_dspark_draft_spec([1])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        resolve_dspark_draft_spec(None)  # type: ignore[arg-type]


def test_no_match_error_names_requested_supported_and_hint(plugin_site):
    _other_plugin(plugin_site)
    with pytest.raises(DraftSpecNotFoundError) as info:
        resolve_dspark_draft_spec(["LlamaForCausalLM", "MistralForCausalLM"])
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "LlamaForCausalLM" in message and "MistralForCausalLM" in message
    assert "GoodForLM" in message
    assert "pip install dspark-llama" in message


def test_in_process_registration_and_fixture(dspark_registry):
    assert len(dspark_registry) == 0  # installed plugins are hidden by the fixture
    dspark_core.register_spec("InlineForLM", "fam_inline:D")

    class Plugin:
        @hookimpl
        def dspark_draft_specs(self):
            return {"ObjForLM": DSparkDraftSpec("fam_obj:D")}

    name = dspark_core.register_plugin(Plugin(), name="obj")
    assert resolve_dspark_draft_spec(["InlineForLM"]).reference == "fam_inline:D"
    assert resolve_dspark_draft_spec(["ObjForLM"]).reference == "fam_obj:D"
    dspark_registry.unregister(name)
    assert "ObjForLM" not in dspark_registry


def test_in_process_registration_conflicts_unless_override(plugin_site):
    plugin_site(
        "fam-one",
        entry_points={"one": "fam_one"},
        modules={"fam_one": spec_plugin_source({"XForLM": "fam_one:D"})},
    )
    with DSPARK_DRAFT_REGISTRY.isolated():
        DSPARK_DRAFT_REGISTRY.register_spec("XForLM", "fam_x:Second")
        with pytest.raises(DraftSpecConflictError, match="fam-one"):
            resolve_dspark_draft_spec(["XForLM"])
        with pytest.raises(ValueError, match="override=True"):
            DSPARK_DRAFT_REGISTRY.register_spec("XForLM", "fam_x:Third")
        DSPARK_DRAFT_REGISTRY.register_spec("XForLM", "fam_x:Third", override=True)
        assert resolve_dspark_draft_spec(["XForLM"]).reference == "fam_x:Third"
    assert resolve_dspark_draft_spec(["XForLM"]).reference == "fam_one:D"  # isolation undid both


def test_isolation_restores_previous_state():
    with dspark_core.isolated_registry(autoload=False) as registry:
        registry.register_spec("TempForLM", "fam_temp:D")
        assert "TempForLM" in registry
    assert "TempForLM" not in DSPARK_DRAFT_REGISTRY


def test_lazy_spec_imports_on_first_access_and_names_the_plugin(plugin_site):
    plugin_site(
        "fam-lazy",
        "0.3",
        entry_points={"lazy": "fam_lazy"},
        modules={
            "fam_lazy": spec_plugin_source(
                {"LazyForLM": "fam_lazy_model:Draft", "GoneForLM": "fam_gone_model:Draft"}
            ),
            "fam_lazy_model": "class Draft:\n    pass\n",
        },
    )
    spec = resolve_dspark_draft_spec(["LazyForLM"])
    assert "fam_lazy_model" not in sys.modules
    assert spec.draft_cls.__name__ == "Draft"
    assert "fam_lazy_model" in sys.modules
    assert spec.draft_cls is spec.draft_cls
    with pytest.raises(DraftClassImportError) as info:
        resolve_dspark_draft_spec(["GoneForLM"]).draft_cls  # noqa: B018
    assert "fam_gone_model:Draft" in str(info.value) and "fam-lazy 0.3" in str(info.value)


def test_spec_is_frozen_hashable_and_compares_by_reference():
    from collections import OrderedDict

    by_class = DSparkDraftSpec(OrderedDict)
    by_name = DSparkDraftSpec("collections:OrderedDict")
    assert by_class == by_name and hash(by_class) == hash(by_name)
    assert by_name.draft_cls is OrderedDict
    assert by_class != DSparkDraftSpec("collections:Counter")
    with pytest.raises(AttributeError):
        by_class.provider = "x"  # type: ignore[misc]
    with pytest.raises(ValueError, match="malformed"):
        DSparkDraftSpec("no_colon_here")
    assert isinstance(by_class, dspark_core.DraftSpec)


def test_concurrent_first_access_imports_once(tmp_path, monkeypatch):
    (tmp_path / "fam_slow.py").write_text(
        "import builtins, time\nbuiltins.fam_slow_imports = getattr(builtins, 'fam_slow_imports', 0) + 1\n"
        "time.sleep(0.2)\nclass Draft:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = DSparkDraftSpec("fam_slow:Draft")
    results = []
    threads = [threading.Thread(target=lambda: results.append(spec.draft_cls)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    import builtins

    assert builtins.fam_slow_imports == 1 and len({id(cls) for cls in results}) == 1
    del builtins.fam_slow_imports
    sys.modules.pop("fam_slow", None)


# -- issue 10: selectors, conflicts and hints ------------------------------------------------------


def _plugin(plugin_site, distribution, entry_points):
    """Install ``distribution`` with ``{entry point: {architecture: class reference}}``."""
    modules = {}
    for name, mapping in entry_points.items():
        modules[f"fam_{distribution.replace('-', '_')}_{name.replace('-', '_')}"] = spec_plugin_source(
            mapping
        )
    plugin_site(distribution, entry_points=dict(zip(entry_points, modules, strict=True)), modules=modules)


#: Two layouts where a bare entry-point name blocks more than one distribution.
CONFLICT_LAYOUTS = {
    # The README's snippet invites `llama =`: two distributions, one entry-point name.
    "same-entry-point": {
        "dspark-llama": {"llama": {"LlamaForCausalLM": "fam_a:D"}},
        "llama-drafts": {"llama": {"LlamaForCausalLM": "fam_b:D"}},
    },
    # One distribution's entry point is named like the other distribution.
    "entry-point-named-like-a-distribution": {
        "fam-x": {"fam-y": {"LlamaForCausalLM": "fam_a:D"}},
        "fam-y": {"y": {"LlamaForCausalLM": "fam_b:D"}},
    },
}


@pytest.mark.parametrize("layout", sorted(CONFLICT_LAYOUTS))
def test_conflict_hint_selectors_each_keep_exactly_one_distribution(plugin_site, monkeypatch, layout):
    import re

    for distribution, entry_points in CONFLICT_LAYOUTS[layout].items():
        _plugin(plugin_site, distribution, entry_points)
    with pytest.raises(DraftSpecConflictError) as info:
        resolve_dspark_draft_spec(["LlamaForCausalLM"])
    choices = re.findall(r"DSPARK_DISABLE_PLUGINS=(\S+) keeps plugin '[^']+' \((\S+) ", str(info.value))
    assert len(choices) == 2, str(info.value)
    kept_references = set()
    for selector, kept_distribution in choices:
        monkeypatch.setenv("DSPARK_DISABLE_PLUGINS", selector)
        DSPARK_DRAFT_REGISTRY.refresh()
        with warnings.catch_warnings():
            warnings.simplefilter("error", DSparkPluginWarning)  # a hinted selector is never ambiguous
            entry = DSPARK_DRAFT_REGISTRY.resolve_entry(["LlamaForCausalLM"])
        assert entry.plugin.distribution == kept_distribution  # it keeps the one it says it keeps
        kept_references.add(spec_reference(entry.spec))
        blocked = [p for p in DSPARK_DRAFT_REGISTRY.report().plugins if p.status == "blocked"]
        assert len(blocked) == 1, (selector, blocked)
    assert kept_references == {"fam_a:D", "fam_b:D"}


def test_an_entry_point_name_matching_several_distributions_warns(plugin_site, monkeypatch):
    for distribution, entry_points in CONFLICT_LAYOUTS["same-entry-point"].items():
        _plugin(plugin_site, distribution, entry_points)
    monkeypatch.setenv("DSPARK_DISABLE_PLUGINS", "llama")
    DSPARK_DRAFT_REGISTRY.refresh()
    with pytest.warns(DSparkPluginWarning, match="matches plugins of 2 distributions") as record:
        assert "LlamaForCausalLM" not in DSPARK_DRAFT_REGISTRY  # it blocked both
    message = str(record[0].message)
    assert "dspark-llama 1.0" in message and "llama-drafts 1.0" in message
    assert "distribution:entry-point" in message
    assert DSPARK_DRAFT_REGISTRY.report().ambiguous_selection == ["llama"]
    monkeypatch.setenv("DSPARK_DISABLE_PLUGINS", "llama-drafts")
    DSPARK_DRAFT_REGISTRY.refresh()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DSparkPluginWarning)
        assert resolve_dspark_draft_spec(["LlamaForCausalLM"]).reference == "fam_a:D"
    assert DSPARK_DRAFT_REGISTRY.report().ambiguous_selection == []


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("DSPARK_DISABLE_PLUGINS", "fam-multi:second", ["FirstForLM"]),
        ("DSPARK_DISABLE_PLUGINS", " fam_multi : SECOND ,", ["FirstForLM"]),
        ("DSPARK_PLUGINS", "fam-multi:first", ["FirstForLM"]),
        ("DSPARK_PLUGINS", "fam-multi", ["FirstForLM", "SecondForLM"]),
    ],
)
def test_distribution_colon_entry_point_selects_one_entry_point(
    plugin_site, monkeypatch, variable, value, expected
):
    _plugin(
        plugin_site, "fam-multi", {"first": {"FirstForLM": "fam_m:A"}, "second": {"SecondForLM": "fam_m:B"}}
    )
    monkeypatch.setenv(variable, value)
    DSPARK_DRAFT_REGISTRY.refresh()
    names = sorted(n for n in DSPARK_DRAFT_REGISTRY if n in ("FirstForLM", "SecondForLM"))
    assert names == expected
    assert DSPARK_DRAFT_REGISTRY.report().unknown_selection == []
    if "SecondForLM" not in expected:
        assert "fam_fam_multi_second" not in sys.modules


def test_unknown_distribution_colon_entry_point_warns(plugin_site, monkeypatch):
    _plugin(plugin_site, "fam-multi", {"first": {"FirstForLM": "fam_m:A"}})
    monkeypatch.setenv("DSPARK_DISABLE_PLUGINS", "fam-multi:typo")
    DSPARK_DRAFT_REGISTRY.refresh()
    with pytest.warns(DSparkPluginWarning, match="'fam-multi:typo', which matches no installed"):
        assert "FirstForLM" in DSPARK_DRAFT_REGISTRY


def test_in_iteration_len_getitem_and_not_found_agree_on_a_conflict(plugin_site):
    _plugin(plugin_site, "fam-one", {"one": {"SharedForLM": "fam_one:D", "OneForLM": "fam_one:D"}})
    _plugin(plugin_site, "fam-two", {"two": {"SharedForLM": "fam_two:D"}})
    registry = DSPARK_DRAFT_REGISTRY
    # Present but unresolvable: listed and counted, but it has no spec to return.
    assert "SharedForLM" in registry
    assert "SharedForLM" in list(registry) and len(registry) == len(list(registry))
    assert registry.report().entries["SharedForLM"].status == "conflict"
    with pytest.raises(DraftSpecConflictError, match="fam-one"):
        registry["SharedForLM"]
    with pytest.raises(DraftSpecConflictError):
        registry.resolve(["SharedForLM", "OneForLM"])  # found first, so its conflict is the answer
    with pytest.raises(DraftSpecNotFoundError) as info:
        registry.resolve(["NopeForLM"])
    message = str(info.value)
    supported = message.split("Supported architectures:")[1].split(".")[0]
    assert "OneForLM" in supported and "SharedForLM" not in supported
    assert "Registered but unresolvable (plugins conflict): SharedForLM" in message


def test_strict_error_puts_each_failure_on_its_own_line(plugin_site, monkeypatch):
    plugin_site("fam-broken1", entry_points={"broken1": "fam_broken1"}, modules={"fam_broken1": "1/0\n"})
    source = "raise ImportError('first line\\nsecond line')\n"
    plugin_site("fam-broken2", entry_points={"broken2": "fam_broken2"}, modules={"fam_broken2": source})
    monkeypatch.setenv("DSPARK_STRICT_PLUGINS", "1")
    DSPARK_DRAFT_REGISTRY.refresh()
    with pytest.raises(PluginLoadError) as info:
        len(DSPARK_DRAFT_REGISTRY)
    lines = str(info.value).splitlines()
    one = [line for line in lines if "fam-broken1" in line]
    two = [line for line in lines if "fam-broken2" in line]
    assert len(one) == 1 and len(two) == 1 and one != two
    assert "ZeroDivisionError" in one[0] and "first line second line" in two[0]
    # Listing tools can still read every failure.
    assert len(DSPARK_DRAFT_REGISTRY.report(strict=False).failures) >= 2


def _llama(plugin_site, broken=False):
    source = "raise ImportError('needs fam_llama_dependency')\n" if broken else None
    plugin_site(
        "dspark-llama",
        entry_points={"llama": "fam_llama"},
        modules={"fam_llama": source or spec_plugin_source({"LlamaForCausalLM": "fam_llama:D"})},
    )


@pytest.mark.parametrize(
    ("case", "expected", "absent"),
    [
        (
            "not installed",
            ["No installed plugin provides it", "pip install dspark-llama"],
            ["failed", "blocked"],
        ),
        (
            "failed",
            ["installed but failed to load", "needs fam_llama_dependency", "dspark-llama"],
            ["pip install"],
        ),
        ("disabled", ["installed but blocked", "remove it from DSPARK_DISABLE_PLUGINS"], ["pip install"]),
        ("not selected", ["installed but blocked", "add dspark-llama to DSPARK_PLUGINS"], ["pip install"]),
    ],
)
def test_not_found_hint_tells_missing_failed_and_blocked_apart(
    plugin_site, monkeypatch, case, expected, absent
):
    _other_plugin(plugin_site)
    if case != "not installed":
        _llama(plugin_site, broken=case == "failed")
    if case == "disabled":
        monkeypatch.setenv("DSPARK_DISABLE_PLUGINS", "llama")
    if case == "not selected":
        monkeypatch.setenv("DSPARK_PLUGINS", "good")
    DSPARK_DRAFT_REGISTRY.refresh()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DSparkPluginWarning)
        with pytest.raises(DraftSpecNotFoundError) as info:
            resolve_dspark_draft_spec(["LlamaForCausalLM"])
    message = str(info.value)
    for text in expected:
        assert text in message, (text, message)
    hint = message.split("Supported architectures:")[1]
    for text in absent:
        assert text not in hint, (text, message)


def test_plugin_warnings_point_at_the_callers_frame(plugin_site):
    _other_plugin(plugin_site)
    plugin_site("fam-broken", entry_points={"broken": "fam_broken"}, modules={"fam_broken": "1/0\n"})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert resolve_dspark_draft_spec(["GoodForLM"]).reference == "fam_good:D"
    (warning,) = [w for w in record if issubclass(w.category, DSparkPluginWarning)]
    assert warning.filename == __file__


def test_cli_doctor_and_testing_use_only_the_registrys_public_api():
    """Issue 10 item 6: no underscore names imported from the registry, no private attributes read."""
    import ast
    from pathlib import Path

    package = Path(dspark_core.__file__).parent
    files = [*sorted((package / "cli").glob("*.py")), package / "testing.py", package / "doctor.py"]
    files = [path for path in files if path.exists()]
    members = [*vars(DSPARK_DRAFT_REGISTRY), *vars(type(DSPARK_DRAFT_REGISTRY))]
    private = {name for name in members if name.startswith("_") and not name.startswith("__")}
    assert {"_lock", "_autoload"} <= private  # the check below knows what to look for
    offences = []
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dspark_core"):
                offences += [f"{path.name}: imports {a.name}" for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.Attribute) and node.attr in private:
                offences.append(f"{path.name}:{node.lineno}: reads .{node.attr}")
    assert offences == []
