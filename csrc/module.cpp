// Python entry point of ttdist._C: importing it runs the TORCH_LIBRARY registrations.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "ttdist TT lookup ops (torch.ops.ttdist)", -1, nullptr};
  return PyModule_Create(&module);
}
