// Bound methods that refuse an instance whose C++ object was never constructed.
//
// pybind11 makes an instance in two steps: __new__ allocates the Python object, __init__ constructs
// the C++ one.  `cls.__new__(cls)` without __init__ (or with an __init__ that raised) leaves the
// second step undone, and pybind11's own cast of such a `self` allocates raw storage on first use
// and hands it to the method as if it were the object: a garbage num_domains, a crash in fill().
// Its "__init__() must be called when overriding __init__" check covers only cls(...).
//
// A method bound as checked<&T::f> takes Self<T> in place of `self`; its caster below checks the
// flag pybind11 sets once __init__ has constructed the object (the flag that check reads), and
// raises TypeError otherwise.  Per call that is the type check and lookup pybind11's own cast does,
// plus one flag read: nothing that depends on the size of the call.
//
// For classes whose instances Python makes (through __init__) only: pybind11 gives no holder to an
// instance wrapping an object that C++ returned by reference either, and this would refuse it.
#pragma once

#include <pybind11/pybind11.h>

#include <string>
#include <typeinfo>
#include <utility>

namespace fastmix {

// `self` of a bound method of T, constructed.
template <class T>
struct Self {
  const T* obj = nullptr;
};

template <auto F>
struct CheckedMethod;

template <class T, class R, class... A, R (T::*F)(A...) const>
struct CheckedMethod<F> {
  static R call(Self<T> self, A... args) { return (self.obj->*F)(std::forward<A>(args)...); }
};

// The const member function F of T as a function of (Self<T>, F's arguments), for .def and
// .def_property_readonly.
template <auto F>
constexpr auto checked = &CheckedMethod<F>::call;

}  // namespace fastmix

namespace pybind11 {
namespace detail {

template <class T>
class type_caster<fastmix::Self<T>> {
 public:
  // Signatures and docstrings name the class, as for a plain `self`.
  PYBIND11_TYPE_CASTER(fastmix::Self<T>, make_caster<T>::name);

  bool load(handle src, bool /*convert*/) {
    const type_info* tinfo = get_type_info(typeid(T));
    if (tinfo == nullptr || !PyObject_TypeCheck(src.ptr(), tinfo->type)) return false;
    auto* inst = reinterpret_cast<instance*>(src.ptr());
    const value_and_holder v_h = inst->get_value_and_holder(tinfo, /*throw_if_missing=*/false);
    if (v_h.inst == nullptr) return false;
    if (!v_h.holder_constructed()) throw type_error(not_initialised(src, tinfo));
    value.obj = v_h.value_ptr<T>();
    return true;
  }

 private:
  static std::string not_initialised(handle src, const type_info* tinfo) {
    PyTypeObject* type = Py_TYPE(src.ptr());
    auto name = [](PyTypeObject* t) {
      return std::string(str(handle(reinterpret_cast<PyObject*>(t)).attr("__name__")));
    };
    std::string message = name(type) + " is not initialised: construct it with " + name(type) +
                          "(...)";
    if (type != tinfo->type) message += ", whose __init__ must call " + name(tinfo->type) +
                                        ".__init__";
    return message;
  }
};

}  // namespace detail
}  // namespace pybind11
