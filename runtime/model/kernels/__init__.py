"""C kernels, built at first use for the CPU they run on: the fp32 neuron-sparse FFN and the block-quantized
matrix kernels."""
