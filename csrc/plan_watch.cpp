// fusedlr._C.watch_unchanged: fusedlr.watch.unchanged in one pass, without building a snapshot. It walks
// param_groups and optimizer.state in the order of fusedlr.watch.snapshot and compares each item with the
// recorded one as fusedlr.watch._same does: the same object, or an equal int (a length) or str (an option).
//
// After a walk found everything as recorded, ``memo`` (a bytearray of the plan) keeps what tells, at a later
// step, that a dict has not changed since, so that the step reads none of its entries:
// - CPython before 3.12: the dicts' ``ma_version_tag`` (it changes with every change to the dict, to a value no
//   dict had before), for the group dicts, optimizer.state and each parameter's state: one load per parameter;
//   a group an LR scheduler changed (``lr``) is walked again.
// - CPython 3.12 and later (where that tag is deprecated): a dict watcher (PyDict_AddWatcher) on optimizer.state
//   and each parameter's state counts every change to any watched dict; the memo keeps that count: one compare.
//   Group dicts are not watched (an LR scheduler writes them every step) and are walked every step.
#include "plan_watch.h"

#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fusedlr {
namespace {

#if PY_VERSION_HEX < 0x030C0000
constexpr bool kDictVersions = true;
uint64_t version_of(PyObject* dict) { return reinterpret_cast<PyDictObject*>(dict)->ma_version_tag; }
#else
constexpr bool kDictVersions = false;
uint64_t version_of(PyObject* /*dict*/) { return 0; }

// The dict watcher of CPython >= 3.12: ``changes`` counts the events (any change, a copy into it, its
// deallocation) of every dict it watches; -1: no watcher (none was free), every step walks everything.
std::atomic<uint64_t> changes{0};
int watcher = -2;  // -2: not added yet

int count_change(PyDict_WatchEvent /*event*/, PyObject* /*dict*/, PyObject* /*key*/, PyObject* /*value*/) {
  changes.fetch_add(1, std::memory_order_relaxed);
  return 0;
}

int dict_watcher() {
  if (watcher == -2) {
    watcher = PyDict_AddWatcher(count_change);
    if (watcher < 0) PyErr_Clear();
  }
  return watcher;
}
#endif

// A dict of the snapshot and its version when a walk last found it as recorded.
struct Seen {
  PyObject* dict;
  uint64_t version;
};

bool still(const Seen& s, PyObject* dict) { return kDictVersions && s.dict == dict && s.version == version_of(dict); }

// The recorded snapshot and the position of the next item to compare.
struct Cursor {
  PyObject* const* items;
  Py_ssize_t size;
  Py_ssize_t pos = 0;

  // The next recorded item is ``now`` itself (fusedlr.watch._same on objects).
  bool object(PyObject* now) { return pos < size && items[pos++] == now; }

  // The next recorded item is the int ``n`` (a length, -1: not a dict).
  bool length(Py_ssize_t n) {
    if (pos >= size) return false;
    PyObject* then = items[pos++];
    if (!PyLong_CheckExact(then)) return false;
    const Py_ssize_t recorded = PyLong_AsSsize_t(then);
    if (recorded == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return recorded == n;
  }

  // The next recorded item is ``now`` or an int or str equal to it (-1: a Python error is set).
  int option(PyObject* now) {
    if (pos >= size) return 0;
    PyObject* then = items[pos++];
    if (now == then) return 1;
    if (Py_TYPE(now) != Py_TYPE(then) || !(PyLong_CheckExact(now) || PyUnicode_CheckExact(now))) return 0;
    return PyObject_RichCompareBool(now, then, Py_EQ);
  }

  // A group's params list (``params``, recorded next): its length and its parameters.
  bool params(PyObject* params) {
    if (!object(params) || !(PyList_Check(params) || PyTuple_Check(params))) return false;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(params);
    if (!length(n)) return false;
    PyObject** ps = PySequence_Fast_ITEMS(params);
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!object(ps[i])) return false;
    }
    return true;
  }
};

// The items of one param group (1: as recorded, 0: changed, -1: a Python error is set). ``seen``: the group
// dict's version after the last walk; the dict's own entries (``params`` and the options) are not read when
// it still has it.
int group_unchanged(Cursor& c, PyObject* group, PyObject* options, PyObject* params_key, const Seen* seen) {
  const Py_ssize_t n_options = PyTuple_GET_SIZE(options);
  if (seen != nullptr && still(*seen, group)) {
    if (!c.object(group) || c.pos >= c.size || !c.params(c.items[c.pos])) return 0;
    c.pos += n_options;
    return c.pos <= c.size ? 1 : 0;
  }
  if (!c.object(group) || !PyDict_Check(group)) return 0;
  PyObject* params = PyDict_GetItemWithError(group, params_key);  // borrowed
  if (params == nullptr) return PyErr_Occurred() ? -1 : 0;
  if (!c.params(params)) return 0;
  for (Py_ssize_t k = 0; k < n_options; ++k) {
    PyObject* value = PyDict_GetItemWithError(group, PyTuple_GET_ITEM(options, k));
    if (value == nullptr) {
      if (PyErr_Occurred()) return -1;
      value = Py_None;  // group.get(key)
    }
    const int same = c.option(value);
    if (same != 1) return same;
  }
  return 1;
}

// The items of optimizer.state: its entries and, for each dict value, that dict's entries; ``dicts``
// receives the state and those dicts, in order.
bool state_unchanged(Cursor& c, PyObject* state, std::vector<Seen>& dicts) {
  if (!c.object(state) || !PyDict_Check(state) || !c.length(PyDict_GET_SIZE(state))) return false;
  dicts.push_back({state, version_of(state)});
  Py_ssize_t at = 0;
  PyObject *key, *value;
  while (PyDict_Next(state, &at, &key, &value)) {
    if (!c.object(key) || !c.object(value)) return false;
    if (!PyDict_Check(value)) {
      if (!c.length(-1)) return false;
      continue;
    }
    if (!c.length(PyDict_GET_SIZE(value))) return false;
    dicts.push_back({value, version_of(value)});
    Py_ssize_t inner = 0;
    PyObject *entry_key, *entry;
    while (PyDict_Next(value, &inner, &entry_key, &entry)) {
      if (!c.object(entry_key) || !c.object(entry)) return false;
    }
  }
  return c.pos == c.size;
}

// Writes ``bytes`` bytes at ``data`` into ``memo``; false with a Python error set.
bool write_memo(PyObject* memo, const void* data, Py_ssize_t bytes) {
  if (PyByteArray_GET_SIZE(memo) != bytes && PyByteArray_Resize(memo, bytes) < 0) return false;
  if (bytes > 0) std::memcpy(PyByteArray_AS_STRING(memo), data, static_cast<size_t>(bytes));
  return true;
}

#if PY_VERSION_HEX < 0x030C0000
// The memo: a Seen per group dict, then for optimizer.state and each parameter's state.

// Whether optimizer.state and every parameter's state (``seen`` from ``first`` on) still have their versions.
bool state_still(PyObject* memo, Py_ssize_t first, PyObject* state) {
  const Py_ssize_t n_seen = PyByteArray_GET_SIZE(memo) / static_cast<Py_ssize_t>(sizeof(Seen));
  const Seen* seen = reinterpret_cast<const Seen*>(PyByteArray_AS_STRING(memo));
  if (first >= n_seen || !still(seen[first], state)) return false;
  for (Py_ssize_t i = first + 1; i < n_seen; ++i) {
    if (!still(seen[i], seen[i].dict)) return false;
  }
  return true;
}

bool remember(PyObject* memo, const std::vector<Seen>& dicts, Py_ssize_t /*first*/) {
  return write_memo(memo, dicts.data(), static_cast<Py_ssize_t>(dicts.size() * sizeof(Seen)));
}
#else
// The memo: the watcher's count of changes when a walk last found optimizer.state as recorded.

bool state_still(PyObject* memo, Py_ssize_t /*first*/, PyObject* /*state*/) {
  uint64_t then;
  if (dict_watcher() < 0 || PyByteArray_GET_SIZE(memo) != static_cast<Py_ssize_t>(sizeof(then))) return false;
  std::memcpy(&then, PyByteArray_AS_STRING(memo), sizeof(then));
  return then == changes.load(std::memory_order_relaxed);
}

// Watches optimizer.state and each parameter's state (``dicts`` from ``first`` on), then keeps the count.
bool remember(PyObject* memo, const std::vector<Seen>& dicts, Py_ssize_t first) {
  const int id = dict_watcher();
  if (id < 0) return true;
  for (size_t i = static_cast<size_t>(first); i < dicts.size(); ++i) {
    if (PyDict_Watch(id, dicts[i].dict) < 0) return false;
  }
  const uint64_t now = changes.load(std::memory_order_relaxed);
  return write_memo(memo, &now, sizeof(now));
}
#endif

}  // namespace

PyObject* watch_unchanged(PyObject* /*self*/, PyObject* args) {
  PyObject *groups, *state, *watched, *options, *memo;
  if (!PyArg_ParseTuple(args, "OOO!O!O!:watch_unchanged", &groups, &state, &PyTuple_Type, &watched, &PyTuple_Type,
                        &options, &PyByteArray_Type, &memo)) {
    return nullptr;
  }
  static PyObject* params_key = PyUnicode_InternFromString("params");
  if (params_key == nullptr) return nullptr;
  Cursor c{&PyTuple_GET_ITEM(watched, 0), PyTuple_GET_SIZE(watched)};
  if (!c.object(groups) || !(PyList_Check(groups) || PyTuple_Check(groups))) Py_RETURN_FALSE;
  const Py_ssize_t n_groups = PySequence_Fast_GET_SIZE(groups);
  if (!c.length(n_groups)) Py_RETURN_FALSE;
  const Py_ssize_t n_seen = PyByteArray_GET_SIZE(memo) / static_cast<Py_ssize_t>(sizeof(Seen));
  const Seen* seen =
      kDictVersions && n_seen > n_groups ? reinterpret_cast<const Seen*>(PyByteArray_AS_STRING(memo)) : nullptr;
  std::vector<Seen> dicts;
  for (Py_ssize_t gi = 0; gi < n_groups; ++gi) {
    PyObject* group = PySequence_Fast_ITEMS(groups)[gi];
    const int same = group_unchanged(c, group, options, params_key, seen == nullptr ? nullptr : &seen[gi]);
    if (same < 0) return nullptr;
    if (same == 0) Py_RETURN_FALSE;
    dicts.push_back({group, version_of(group)});
  }
  if (state_still(memo, n_groups, state) && c.pos < c.size && c.items[c.pos] == state) {
    if (seen != nullptr) {  // the groups' versions
      std::memcpy(PyByteArray_AS_STRING(memo), dicts.data(), dicts.size() * sizeof(Seen));
    }
    Py_RETURN_TRUE;
  }
  if (!state_unchanged(c, state, dicts)) Py_RETURN_FALSE;
  if (!remember(memo, dicts, n_groups)) return nullptr;
  Py_RETURN_TRUE;
}

}  // namespace fusedlr
