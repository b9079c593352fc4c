"""Torch modules: an MLP, the Gaussian decoder and the Gaussian encoder.

Modules are defined at module level so that fitted estimators pickle. They
are initialised from an explicit ``torch.Generator`` (never torch's global
random state) and count the rows they push forward, which is how the
benchmarks compare the training cost of the estimators.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS = {
    "identity": nn.Identity,
    "logistic": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
}
#: The slope of each activation, from its input ``a`` and output ``y``
#: (None: 1), for ``GaussianDecoder.mean_and_jacobian``.
ACTIVATION_SLOPES = {
    nn.Identity: None,
    nn.Sigmoid: lambda a, y: y * (1 - y),
    nn.Tanh: lambda a, y: 1 - y * y,
    nn.ReLU: lambda a, y: (a > 0).to(a.dtype),
}

#: Smallest noise standard deviation, in standardized units.
MIN_SCALE = 1e-3
#: softplus(INITIAL_RAW_SCALE) + MIN_SCALE = 0.1, the initial noise scale.
INITIAL_RAW_SCALE = math.log(math.expm1(0.1 - 1e-3))
#: Bounds on encoder log standard deviations, for numerical safety.
LOG_STD_BOUNDS = (-12.0, 6.0)


class MLP(nn.Module):
    """A fully connected network ``n_in -> hidden_layer_sizes -> n_out``."""

    def __init__(self, n_in, n_out, hidden_layer_sizes, activation):
        super().__init__()
        sizes = [n_in, *hidden_layer_sizes, n_out]
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)
        self.rows_forward = 0

    @property
    def flops_per_row(self):
        """Multiply-adds of one forward row, times two (a FLOP count)."""
        return sum(
            2 * m.in_features * m.out_features
            for m in self.net
            if isinstance(m, nn.Linear)
        )

    def forward(self, x):
        self.rows_forward += x[..., 0].numel()
        return self.net(x)


def build(module_class, generator, *args):
    """Construct ``module_class(*args)`` and initialise it from ``generator``.

    ``nn.Linear`` draws its default initialisation from torch's global
    generator; construction happens inside ``fork_rng`` so that the global
    state is left exactly as it was.
    """
    with torch.random.fork_rng(devices=[]):
        module = module_class(*args)
    init_parameters(module, generator)
    return module


def init_parameters(module, generator):
    """Initialise every ``nn.Linear`` of ``module`` from ``generator``.

    Same scheme as ``nn.Linear.reset_parameters`` (uniform with bound
    ``1/sqrt(fan_in)``), but reproducible and without touching global state.
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                w = torch.empty(m.weight.shape, dtype=torch.float64)
                w.uniform_(-bound, bound, generator=generator)
                m.weight.copy_(w)
                b = torch.empty(m.bias.shape, dtype=torch.float64)
                b.uniform_(-bound, bound, generator=generator)
                m.bias.copy_(b)


def gaussian_log_prob(x, mean, scale):
    """log N(x; mean, diag(scale^2)) summed over the last axis (broadcasts)."""
    z = (x - mean) / scale
    return -0.5 * (z * z).sum(-1) - torch.log(scale).sum(-1) - 0.5 * x.shape[
        -1
    ] * math.log(2 * math.pi)


def standard_normal_log_prob(z):
    """log N(z; 0, I) summed over the last axis."""
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


class GaussianDecoder(nn.Module):
    """p(x | z) = N(x; f(z), diag(scale^2)) with a learned per-feature scale.

    ``f(z) = mlp(z) + z @ linear_weight.T``: the linear part (zero unless set,
    e.g. by ``init_linear``) lets the decoder contain its linear special
    case, probabilistic PCA, exactly, so that training can start there. The
    scale is ``MIN_SCALE + softplus(raw_scale)`` so that it never reaches
    zero, even on constant columns.
    """

    def __init__(self, n_components, n_features, hidden_layer_sizes, activation):
        super().__init__()
        self.mean_net = MLP(n_components, n_features, hidden_layer_sizes, activation)
        self.linear_weight = nn.Parameter(torch.zeros(n_features, n_components))
        # Start at noise 0.1 in standardized units: starting at 1 lets the
        # decoder explain everything as noise, and VAE/IWAE then collapse to a
        # Gaussian blob (measured on the spiral and circle sets).
        self.raw_scale = nn.Parameter(torch.full((n_features,), INITIAL_RAW_SCALE))

    @property
    def scale(self):
        return MIN_SCALE + F.softplus(self.raw_scale)

    def set_scale(self, scale):
        """Set the noise scale (standardized units), floored at ``MIN_SCALE``."""
        target = torch.clamp(scale - MIN_SCALE, min=1e-12)
        with torch.no_grad():
            # inverse softplus, stable for large and small targets
            self.raw_scale.copy_(target + torch.log(-torch.expm1(-target)))

    def forward(self, z):
        h = self.mean_net(z)
        # the linear part added in the same kernel as its product (addmm):
        # one operation less per step, forward and backward
        return torch.addmm(h.reshape(-1, h.shape[-1]), z.reshape(-1, z.shape[-1]),
                           self.linear_weight.T).reshape(h.shape)

    def mean_function(self, z):
        """``f(z)`` without counting rows (for Jacobians and diagnostics)."""
        return self.mean_net.net(z) + z @ self.linear_weight.T

    def mean_and_jacobian(self, z):
        """``mean_function(z)`` (n, D) and its Jacobian (n, D, d).

        Forward-mode differentiation written out: the tangents of all ``d``
        latent directions go through the layers together, a linear layer
        mapping them by its weight and an activation scaling them by its
        slope. ``torch.func.jvp`` gives the same values (tested), but its
        first call imports ``torch._dynamo`` (1.1-1.4 s once per process, a
        quarter of a first 150-row MAPA fit).
        """
        n, d = z.shape
        h = z
        tangents = torch.eye(d, dtype=z.dtype, device=z.device).expand(n, d, d)
        for m in self.mean_net.net:
            a = h
            h = m(a)
            if isinstance(m, nn.Linear):
                tangents = torch.matmul(m.weight, tangents)
            elif ACTIVATION_SLOPES[type(m)] is not None:
                tangents = ACTIVATION_SLOPES[type(m)](a, h).unsqueeze(-1) * tangents
        return h + z @ self.linear_weight.T, tangents + self.linear_weight

    def init_linear(self, weight, offset, scale):
        """Start at the linear model ``f(z) = offset + weight z``, noise ``scale``.

        The network's last layer is zeroed (its bias holds ``offset``), so the
        nonlinear part starts at zero and training can only add to the
        linear fit.
        """
        last = self.mean_net.net[-1]
        with torch.no_grad():
            self.linear_weight.copy_(torch.as_tensor(weight).to(self.linear_weight))
            last.weight.zero_()
            last.bias.copy_(torch.as_tensor(offset).to(last.bias))
        self.set_scale(torch.as_tensor(scale).to(self.raw_scale))

    def log_prob(self, x, z):
        """log p(x | z); ``x`` broadcasts against the leading axes of ``z``."""
        return gaussian_log_prob(x, self(z), self.scale)


class StackedDecoders(nn.Module):
    """Several ``GaussianDecoder`` of one architecture, trained as one network.

    Model ``c``'s parameters are slice ``c`` of stacked tensors, and a forward
    pass takes codes of shape ``(n_models, batch, d)`` through batched matrix
    products (``baddbmm``). On the default networks one step of three stacked
    models costs about two thirds of three separate steps: the per-operation
    overhead of eager torch, not arithmetic, dominates a small network's
    step. Adam is elementwise, so the models train independently when the
    loss is the sum of their losses (and their gradients are clipped each on
    its own, ``_base.clip_grad_norm_per_model``). MAPA's candidate starts
    are trained this way.
    """

    def __init__(self, decoders):
        super().__init__()
        first = decoders[0]
        self.n_models = len(decoders)
        self._linear_keys = [f"mean_net.net.{j}" for j, m in enumerate(first.mean_net.net)
                             if isinstance(m, nn.Linear)]
        self.activation = next((m for m in first.mean_net.net if not isinstance(m, nn.Linear)),
                               nn.Identity())
        states = [d.state_dict() for d in decoders]

        def stack(key):
            return nn.Parameter(torch.stack([s[key].detach() for s in states]).clone())

        self.weights = nn.ParameterList([stack(k + ".weight") for k in self._linear_keys])
        self.biases = nn.ParameterList([stack(k + ".bias") for k in self._linear_keys])
        self.linear_weight = stack("linear_weight")
        self.raw_scale = stack("raw_scale")
        self.rows_forward = 0
        #: The models a forward pass computes (a LongTensor of model
        #: indices), or None for all of them; see ``set_active``.
        self.active = None

    def set_active(self, active):
        """Compute only the models ``active`` (indices; None: all) from now on.

        A model that has finished training (its state taken with
        ``model_state``) costs nothing more: forward passes, ``scale`` and
        the codes' shape ``(len(active), batch, d)`` cover the active models
        only, and the others' parameters get zero gradients.
        """
        self.active = (None if active is None or len(active) == self.n_models
                       else torch.as_tensor(active, dtype=torch.long,
                                            device=self.raw_scale.device))

    def _take(self, stacked):
        return stacked if self.active is None else stacked.index_select(0, self.active)

    @property
    def scale(self):
        """Noise scales of the active models, shape ``(n_active, 1, n_features)``."""
        return (MIN_SCALE + F.softplus(self._take(self.raw_scale))).unsqueeze(1)

    def forward(self, z):
        self.rows_forward += z[..., 0].numel()
        h = z
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(self._take(bias).unsqueeze(1), h,
                              self._take(weight).transpose(1, 2))
            if i < last:
                h = self.activation(h)
        return torch.baddbmm(h, z, self._take(self.linear_weight).transpose(1, 2))

    def model_state(self, c):
        """Model ``c`` as a ``GaussianDecoder`` state dict (cloned)."""
        state = {}
        for key, weight, bias in zip(self._linear_keys, self.weights, self.biases):
            state[key + ".weight"] = weight[c].detach().clone()
            state[key + ".bias"] = bias[c].detach().clone()
        state["linear_weight"] = self.linear_weight[c].detach().clone()
        state["raw_scale"] = self.raw_scale[c].detach().clone()
        return state


def decayed_weights(module):
    """The parameters of ``module`` that weight decay shrinks.

    The weight matrices of every ``MLP`` (and their stacked copies in
    ``StackedDecoders``): not biases, noise scales, the decoder's linear part
    or MAPA's codes. Shrinking them pulls a decoder towards its linear
    special case ``f(z) = b + W z`` (the last layer's bias is the offset).
    """
    weights = []
    for m in module.modules():
        if isinstance(m, MLP):
            weights += [layer.weight for layer in m.net if isinstance(layer, nn.Linear)]
        elif isinstance(m, StackedDecoders):
            weights += list(m.weights)
    return weights


class GaussianEncoder(nn.Module):
    """q(z | x) = N(z; mu(x), diag(exp(log_std(x))^2)).

    ``mu(x) = mlp(x)[:d] + x @ linear_weight.T``: the linear part (zero unless
    set by ``init_linear``) holds the posterior mean of probabilistic PCA.
    """

    def __init__(self, n_features, n_components, hidden_layer_sizes, activation):
        super().__init__()
        self.net = MLP(n_features, 2 * n_components, hidden_layer_sizes, activation)
        self.linear_weight = nn.Parameter(torch.zeros(n_components, n_features))
        self.n_components = n_components

    def init_linear(self, weight, offset, log_std):
        """Start at ``mu(x) = offset + weight x`` and a constant ``log_std``."""
        last = self.net.net[-1]
        with torch.no_grad():
            self.linear_weight.copy_(torch.as_tensor(weight).to(self.linear_weight))
            last.weight.zero_()
            bias = torch.cat([torch.as_tensor(offset), torch.as_tensor(log_std)])
            last.bias.copy_(bias.to(last.bias))

    def forward(self, x):
        out = self.net(x)
        mu, log_std = out.split(self.n_components, dim=-1)
        return mu + x @ self.linear_weight.T, torch.clamp(log_std, *LOG_STD_BOUNDS)


def mixture_log_prob(z, means, log_stds, log_weights):
    """log of a Gaussian mixture density ``sum_c w_c N(z; means_c, stds_c^2)``.

    ``means`` and ``log_stds`` have shape ``(n, C, d)`` and ``log_weights``
    ``(n, C)`` (normalised); ``z`` has shape ``(..., n, d)``. Returns the log
    density of each ``z`` under its row's mixture, of shape ``(..., n)``.
    """
    lp = gaussian_log_prob(z.unsqueeze(-2), means, torch.exp(log_stds))  # (..., n, C)
    return torch.logsumexp(lp + log_weights, dim=-1)


class DetachedDecoder:
    """A view of a ``GaussianDecoder`` whose parameters receive no gradient.

    ``log_prob(x, z)`` and calls are those of the decoder, computed with its
    parameters detached (``torch.func.functional_call``): gradients still
    flow to ``z``, but none reach (or accumulate in) the decoder. Used to
    train an encoder against a frozen decoder.
    """

    def __init__(self, decoder):
        self.decoder = decoder
        self.params = {k: v.detach() for k, v in decoder.named_parameters()}

    @property
    def scale(self):
        return MIN_SCALE + F.softplus(self.params["raw_scale"])

    def __call__(self, z):
        return torch.func.functional_call(self.decoder, self.params, (z,))

    def log_prob(self, x, z):
        return gaussian_log_prob(x, self(z), self.scale)
