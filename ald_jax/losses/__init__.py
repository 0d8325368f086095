"""Pure loss functions over [T] arrays (vmapped over batch): V-MPO, V-trace, distillation."""
