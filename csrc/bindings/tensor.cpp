#include "tensor.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace attnkit {

int64_t itemsize(DType t) {
  switch (t) {
    case DType::f64:
    case DType::i64:
      return 8;
    case DType::f32:
    case DType::i32:
      return 4;
    case DType::f16:
    case DType::bf16:
      return 2;
    case DType::boolean:
    case DType::i8:
    case DType::f8e4m3:
      return 1;
  }
  return 1;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32:
      return "float32";
    case DType::f64:
      return "float64";
    case DType::f16:
      return "float16";
    case DType::bf16:
      return "bfloat16";
    case DType::boolean:
      return "bool";
    case DType::i32:
      return "int32";
    case DType::i64:
      return "int64";
    case DType::i8:
      return "int8";
    case DType::f8e4m3:
      return "float8_e4m3fn";
  }
  return "?";
}

std::string shape_str(const Tensor& t) {
  std::string s = "(";
  for (int d = 0; d < t.ndim; ++d) {
    if (d) s += ", ";
    s += std::to_string(t.shape[d]);
  }
  if (t.ndim == 1) s += ",";
  return s + ")";
}

void Tensor::byte_extent(uintptr_t* lo, uintptr_t* hi) const {
  intptr_t min_off = 0, max_off = 0;
  for (int d = 0; d < ndim; ++d) {
    if (shape[d] == 0) {
      *lo = *hi = reinterpret_cast<uintptr_t>(data);
      return;
    }
    const intptr_t span = intptr_t(strides[d]) * intptr_t(shape[d] - 1) * intptr_t(itemsize(dtype));
    if (span < 0)
      min_off += span;
    else
      max_off += span;
  }
  *lo = reinterpret_cast<uintptr_t>(data) + min_off;
  *hi = reinterpret_cast<uintptr_t>(data) + max_off + itemsize(dtype);
}

bool may_overlap(const Tensor& a, const Tensor& b) {
  if (!a.data || !b.data) return false;
  uintptr_t alo, ahi, blo, bhi;
  a.byte_extent(&alo, &ahi);
  b.byte_extent(&blo, &bhi);
  if (alo == ahi || blo == bhi) return false;
  return alo < bhi && blo < ahi;
}

bool self_overlapping(const Tensor& t) {
  if (t.numel() <= 1) return false;
  int64_t st[kMaxTensorDims], ext[kMaxTensorDims];
  int n = 0;
  for (int d = 0; d < t.ndim; ++d) {
    if (t.shape[d] <= 1) continue;
    const int64_t s = t.strides[d] < 0 ? -t.strides[d] : t.strides[d];
    int i = n++;
    for (; i > 0 && st[i - 1] > s; --i) st[i] = st[i - 1], ext[i] = ext[i - 1];
    st[i] = s;
    ext[i] = t.shape[d];
  }
  int64_t span = 0;  // elements spanned by the smaller-stride dims, minus one
  bool nested = true;
  for (int i = 0; i < n && nested; ++i) {
    if (st[i] == 0) return true;
    if (st[i] <= span) nested = false;
    span += st[i] * (ext[i] - 1);
  }
  if (nested) return false;
  // Interleaved strides (e.g. 2 and 3 over 3 x 2 elements) may or may not overlap: every
  // offset is listed and compared when that is cheap, else the view is taken as overlapping.
  if (t.numel() > (int64_t(1) << 20)) return true;
  std::vector<int64_t> offs(1, 0);
  for (int i = 0; i < n; ++i) {
    const size_t cur = offs.size();
    for (int64_t e = 1; e < ext[i]; ++e)
      for (size_t j = 0; j < cur; ++j) offs.push_back(offs[j] + e * st[i]);
  }
  std::sort(offs.begin(), offs.end());
  return std::adjacent_find(offs.begin(), offs.end()) != offs.end();
}

bool same_view(const Tensor& a, const Tensor& b) {
  if (a.data != b.data || a.ndim != b.ndim || a.dtype != b.dtype) return false;
  for (int d = 0; d < a.ndim; ++d)
    if (a.shape[d] != b.shape[d] || (a.shape[d] > 1 && a.strides[d] != b.strides[d])) return false;
  return true;
}

void throw_value(const std::string& msg) { throw py::value_error(msg); }
void throw_type(const std::string& msg) { throw py::type_error(msg); }

void check_status(Status s, const char* fn) {
  switch (s) {
    case Status::ok:
      return;
    case Status::out_of_memory:
      // Kernels allocate all their scratch before writing anything (two-phase parallel
      // regions), so the outputs are untouched when this is raised.
      PyErr_SetString(PyExc_MemoryError,
                      (std::string(fn) + ": out of memory for the kernel's scratch buffers; "
                       "the outputs were not written").c_str());
      throw py::error_already_set();
    case Status::invalid_argument:
      throw_value(std::string(fn) + ": the kernel rejected its arguments");
    case Status::not_implemented:
      PyErr_SetString(PyExc_NotImplementedError,
                      (std::string(fn) + ": not implemented for this combination of arguments").c_str());
      throw py::error_already_set();
  }
}

// A dtype stored in the other byte order ('>f4' on a little-endian host): the kernels read
// native numbers only, so such arrays are refused by name, never read as native.
static bool byte_swapped(const py::dtype& dt) {
  const uint16_t one = 1;
  const bool little = *reinterpret_cast<const uint8_t*>(&one) == 1;
  return dt.byteorder() == (little ? '>' : '<');
}

static std::string swapped_note(const py::dtype& dt) {
  return byte_swapped(dt) ? " (non-native byte order; convert it with .astype(arr.dtype.newbyteorder('=')))"
                          : "";
}

static bool numpy_dtype(const py::dtype& dt, DType* out) {
  if (byte_swapped(dt)) return false;
  const char kind = dt.kind();
  const auto size = dt.itemsize();
  if (kind == 'f' && size == 4) return *out = DType::f32, true;
  if (kind == 'f' && size == 8) return *out = DType::f64, true;
  if (kind == 'f' && size == 2) return *out = DType::f16, true;
  if (kind == 'b' && size == 1) return *out = DType::boolean, true;
  if (kind == 'i' && size == 4) return *out = DType::i32, true;
  if (kind == 'i' && size == 8) return *out = DType::i64, true;
  if (kind == 'i' && size == 1) return *out = DType::i8, true;
  // ml_dtypes registers numpy dtypes named "bfloat16" and "float8_e4m3fn".
  if (size == 2 && py::str(dt.attr("name")).cast<std::string>() == "bfloat16")
    return *out = DType::bf16, true;
  if (size == 1 && py::str(dt.attr("name")).cast<std::string>() == "float8_e4m3fn")
    return *out = DType::f8e4m3, true;
  return false;
}

static bool dtype_from_string(const char* s, DType* out) {
  static const struct {
    const char* name;
    DType t;
  } table[] = {{"float32", DType::f32}, {"float64", DType::f64}, {"float16", DType::f16},
               {"bfloat16", DType::bf16}, {"bool", DType::boolean}, {"int32", DType::i32},
               {"int64", DType::i64}, {"int8", DType::i8},
               {"float8_e4m3fn", DType::f8e4m3}};
  for (const auto& e : table)
    if (std::strcmp(s, e.name) == 0) return *out = e.t, true;
  return false;
}

// A raw descriptor tuple (the front end's Arr.desc(), attnkit.torch) read with the C API: it
// is on every call's path, and pybind11's casts (a std::string per dtype, new references per
// item) cost ~4k instructions per array, a third of a small matmul's binding time
// (bench/notes/matmul.md, "fixed cost of a small product"). False if it is not one; a
// descriptor of an unsupported dtype raises TypeError naming `where()`.
template <class Where>
static bool tensor_from_tuple(PyObject* tup, Tensor* t, const Where& where) {
  if (!PyTuple_Check(tup) || PyTuple_GET_SIZE(tup) != 5) return false;
  PyObject* shape = PyTuple_GET_ITEM(tup, 1);
  PyObject* strides = PyTuple_GET_ITEM(tup, 2);
  PyObject* dtype = PyTuple_GET_ITEM(tup, 3);
  if (!PyTuple_Check(shape) || !PyTuple_Check(strides) || !PyUnicode_Check(dtype) ||
      !PyLong_Check(PyTuple_GET_ITEM(tup, 0)))
    return false;
  const Py_ssize_t nd = PyTuple_GET_SIZE(shape);
  if (nd > kMaxTensorDims || PyTuple_GET_SIZE(strides) != nd) return false;
  const char* name = PyUnicode_AsUTF8(dtype);
  if (name == nullptr) {
    PyErr_Clear();
    return false;
  }
  if (!dtype_from_string(name, &t->dtype))
    throw_type(where() + " has unsupported dtype " + name);
  t->data = PyLong_AsVoidPtr(PyTuple_GET_ITEM(tup, 0));
  t->ndim = int(nd);
  for (Py_ssize_t d = 0; d < nd; ++d) {
    t->shape[d] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, d));
    t->strides[d] = PyLong_AsLongLong(PyTuple_GET_ITEM(strides, d));
  }
  const int w = PyObject_IsTrue(PyTuple_GET_ITEM(tup, 4));
  if (PyErr_Occurred() || w < 0) {  // a non-int item (or an int out of range)
    PyErr_Clear();
    return false;
  }
  t->writeable = w != 0;
  return true;
}

namespace {
struct TorchTypes {
  PyTypeObject* tensor = nullptr;
  PyObject* strided = nullptr;
  PyObject* dtype_obj[8] = {};
  DType dtype[8] = {};
  int ndtypes = 0;
  // interned attribute names
  PyObject *data_ptr = nullptr, *shape = nullptr, *stride = nullptr, *dtype_attr = nullptr,
           *is_cpu = nullptr, *layout = nullptr, *is_nested = nullptr, *device = nullptr;
};
TorchTypes g_torch;

// A new reference to obj.name (or obj.name() when call), or throws the pending Python error.
py::object torch_attr(PyObject* obj, PyObject* name, bool call) {
  PyObject* r = call ? PyObject_CallMethodNoArgs(obj, name) : PyObject_GetAttr(obj, name);
  if (r == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}
}  // namespace

void register_torch(py::handle tensor_type, py::handle strided, py::dict dtypes) {
  if (!PyType_Check(tensor_type.ptr())) throw_type("_register_torch: tensor_type must be a type");
  TorchTypes t;
  t.tensor = reinterpret_cast<PyTypeObject*>(tensor_type.inc_ref().ptr());
  t.strided = strided.inc_ref().ptr();
  for (auto item : dtypes) {
    DType d;
    const std::string name = py::str(item.second).cast<std::string>();
    if (t.ndtypes == 8 || !dtype_from_string(name.c_str(), &d))
      throw_value("_register_torch: bad dtype entry " + name);
    t.dtype_obj[t.ndtypes] = item.first.inc_ref().ptr();
    t.dtype[t.ndtypes++] = d;
  }
  t.data_ptr = PyUnicode_InternFromString("data_ptr");
  t.shape = PyUnicode_InternFromString("shape");
  t.stride = PyUnicode_InternFromString("stride");
  t.dtype_attr = PyUnicode_InternFromString("dtype");
  t.is_cpu = PyUnicode_InternFromString("is_cpu");
  t.layout = PyUnicode_InternFromString("layout");
  t.is_nested = PyUnicode_InternFromString("is_nested");
  t.device = PyUnicode_InternFromString("device");
  g_torch = t;  // registered once per process (attnkit.torch's import); never released
}

// A torch.Tensor on the CPU (its storage is what the kernels read and write). Torch has no
// read-only tensors: writeable is true.
template <class Where>
static void tensor_from_torch(PyObject* obj, Tensor* t, const Where& where) {
  const TorchTypes& g = g_torch;
  if (torch_attr(obj, g.is_nested, false).ptr() == Py_True)
    throw_type(where() + " is a nested tensor; attnkit takes dense (strided) tensors");
  py::object layout = torch_attr(obj, g.layout, false);
  if (layout.ptr() != g.strided)
    throw_type(where() + " is a " + py::str(layout).cast<std::string>() +
               " tensor; attnkit takes dense (strided) tensors");
  if (torch_attr(obj, g.is_cpu, false).ptr() != Py_True)
    throw_value(where() + " is on device " + py::str(torch_attr(obj, g.device, false)).cast<std::string>() +
                "; attnkit's CPU kernels need every tensor on the CPU");
  py::object dt = torch_attr(obj, g.dtype_attr, false);
  int i = 0;
  while (i < g.ndtypes && g.dtype_obj[i] != dt.ptr()) ++i;
  if (i == g.ndtypes) throw_type(where() + " has unsupported dtype " + py::str(dt).cast<std::string>());
  t->dtype = g.dtype[i];
  py::object shape = torch_attr(obj, g.shape, false), strides = torch_attr(obj, g.stride, true);
  // (a subclass's __torch_function__ may answer these with anything)
  if (!PyTuple_Check(shape.ptr()) || !PyTuple_Check(strides.ptr()) ||
      PyTuple_GET_SIZE(strides.ptr()) != PyTuple_GET_SIZE(shape.ptr()))
    throw_type(where() + ": its shape and stride() are not tuples of one length");
  const Py_ssize_t nd = PyTuple_GET_SIZE(shape.ptr());
  if (nd > kMaxTensorDims)
    throw_value(where() + " has " + std::to_string(nd) + " dimensions; at most " +
                std::to_string(kMaxTensorDims) + " are supported");
  t->ndim = int(nd);
  for (Py_ssize_t d = 0; d < nd; ++d) {
    t->shape[d] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape.ptr(), d));
    t->strides[d] = PyLong_AsLongLong(PyTuple_GET_ITEM(strides.ptr(), d));
  }
  t->data = PyLong_AsVoidPtr(torch_attr(obj, g.data_ptr, true).ptr());
  if (PyErr_Occurred()) throw py::error_already_set();
  t->writeable = true;
}

Tensor to_tensor(py::handle obj, const char* fn, const char* arg, bool need_writeable) {
  Tensor t;
  auto where = [&] { return std::string(fn) + ": " + arg; };
  if (py::isinstance<py::array>(obj)) {
    py::array a = py::reinterpret_borrow<py::array>(obj);
    if (!numpy_dtype(a.dtype(), &t.dtype))
      throw_type(where() + " has unsupported dtype " + py::str(a.dtype()).cast<std::string>() +
                 swapped_note(a.dtype()));
    if (a.ndim() > kMaxTensorDims)
      throw_value(where() + " has " + std::to_string(a.ndim()) + " dimensions; at most " +
                  std::to_string(kMaxTensorDims) + " are supported");
    t.ndim = int(a.ndim());
    t.data = const_cast<void*>(a.data());
    const int64_t isz = itemsize(t.dtype);
    for (int d = 0; d < t.ndim; ++d) {
      t.shape[d] = a.shape(d);
      const int64_t sb = a.strides(d);
      if (sb % isz != 0)
        throw_value(where() + " has a stride that is not a multiple of its item size; pass "
                    "np.ascontiguousarray(" + std::string(arg) + ")");
      t.strides[d] = sb / isz;
    }
    if (reinterpret_cast<uintptr_t>(t.data) % uintptr_t(isz) != 0 && t.numel() > 0)
      throw_value(where() + " is not aligned to its item size; pass np.ascontiguousarray(" +
                  std::string(arg) + ")");
    t.writeable = a.writeable();
  } else if (g_torch.tensor && PyObject_TypeCheck(obj.ptr(), g_torch.tensor)) {
    tensor_from_torch(obj.ptr(), &t, where);
  } else if (tensor_from_tuple(obj.ptr(), &t, where)) {
    // Raw descriptor from the Python front end or attnkit.torch (already validated there).
  } else if (py::isinstance<py::tuple>(obj) && py::len(obj) == 5) {
    throw_value(where() + ": bad tensor descriptor");
  } else {
    throw_type(where() + " must be a numpy.ndarray, got " +
               py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
  }
  for (int d = 0; d < t.ndim; ++d)
    if (t.shape[d] < 0) throw_value(where() + " has a negative dimension");
  if (need_writeable && !t.writeable) throw_value(where() + " is read-only");
  return t;
}

Tensor to_tensor_or_none(py::handle obj, const char* fn, const char* arg, bool need_writeable) {
  if (obj.is_none()) return absent_tensor();
  return to_tensor(obj, fn, arg, need_writeable);
}

py::tuple describe_numpy(py::handle obj) {
  py::array a = py::reinterpret_borrow<py::array>(obj);
  const py::dtype dt = a.dtype();
  DType t;
  std::string name;
  if (numpy_dtype(dt, &t)) {
    name = dtype_name(t);
  } else if (byte_swapped(dt)) {  // e.g. ">f4 (non-native byte order; ...)": refused by name
    name = py::str(dt).cast<std::string>() + swapped_note(dt);
  } else {
    name = py::str(dt.attr("name")).cast<std::string>();
  }
  const py::ssize_t nd = a.ndim(), isz = dt.itemsize();
  py::tuple shape(nd), strides(nd);
  bool whole = isz > 0;
  for (py::ssize_t d = 0; d < nd; ++d) {
    const py::ssize_t sb = a.strides(d);
    if (isz <= 0 || sb % isz != 0) whole = false;
    // The tuples are new and owned here: filling them through the C API is what it is for.
    PyTuple_SET_ITEM(shape.ptr(), d, PyLong_FromSsize_t(a.shape(d)));
    PyTuple_SET_ITEM(strides.ptr(), d, PyLong_FromSsize_t(isz > 0 ? sb / isz : 0));
  }
  return py::make_tuple(reinterpret_cast<uintptr_t>(a.data()), shape,
                        whole ? py::object(strides) : py::object(py::none()), name,
                        a.writeable());
}

}  // namespace attnkit
