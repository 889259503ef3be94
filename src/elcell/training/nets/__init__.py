"""Networks, one file per family (cellnet: the shared head and heatmap tap;
resnet; efficientnet), build.py to pick one by name and load ImageNet or elcell
weights, and vjp.py for the heatmap's hand-written backward pass."""
