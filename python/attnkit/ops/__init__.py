"""attnkit's ops, one module each: public functions with their input checks, fake implementations
(``torch.library.register_fake``) and autograd formulas (``torch.library.register_autograd``).
Importing a module registers its fake and autograd implementations."""
