"""The training methods, one module each (cm.training_modes collects them): edm (the teacher), consistency (CD, CT,
progressive distillation), ect, scm (sCT, sCD), lcm (LCM, LCF), ufogen; base holds what they share."""
